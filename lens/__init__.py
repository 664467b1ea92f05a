"""lens: LENS (confidence-reweighted GRPO) reference implementation and MLOps pipeline."""

__version__ = "0.1.0"
