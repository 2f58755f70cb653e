"""cmi-fused: the Conditional Mutual Information regulariser as fused Triton kernels."""

from .kd import KDLoss, KDOutput, kd_loss
from .loss import cmi_loss
from .options import CMIOptions, CMIOutput, validate_labels
from .regularizer import CMIRegularizer

__version__ = "0.1.0"

__all__ = [
    "cmi_loss", "kd_loss", "KDLoss", "KDOutput", "CMIOptions", "CMIOutput", "validate_labels", "CMIRegularizer",
    "__version__",
]  # fmt: skip
