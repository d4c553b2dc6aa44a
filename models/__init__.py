"""Networks of the two seed papers (IMRS 3D-ResNeXt+CE, MAT-EffNet) as plain nn.Modules."""

from models.efficientnet import EfficientNet, efficientnet_b0, efficientnet_tiny
from models.excitation import ChannelExcitation, SqueezeExcitation3d
from models.losses import distillation_loss
from models.mat import MATStream, mat_effnet_b0, mat_effnet_tiny
from models.resnext3d import ResNeXt3D, resnext3d_50, resnext3d_101, resnext3d_tiny
from models.two_stream import TwoStreamModel, late_fusion

__all__ = [
    "ChannelExcitation",
    "EfficientNet",
    "MATStream",
    "ResNeXt3D",
    "SqueezeExcitation3d",
    "TwoStreamModel",
    "distillation_loss",
    "efficientnet_b0",
    "efficientnet_tiny",
    "late_fusion",
    "mat_effnet_b0",
    "mat_effnet_tiny",
    "resnext3d_101",
    "resnext3d_50",
    "resnext3d_tiny",
]
