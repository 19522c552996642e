"""Recipe configuration: dataclass schema, strict YAML loading, translation to Megatron."""

from openr1_mega.config.load import apply_overrides, from_dict, load_config, to_dict
from openr1_mega.config.schema import (
    ArchConfig,
    Config,
    ModelConfig,
    MoEArch,
    ParallelConfig,
    PrecisionConfig,
)

__all__ = [
    "ArchConfig",
    "Config",
    "MoEArch",
    "ModelConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "to_dict",
]
