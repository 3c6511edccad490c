"""Training the guides: GenARM's autoregressive reward models (`arm`), CD-FUDGE value models (`value`),
LoRA adapters (`lora`) and the preference pairs they learn from (`preferences`)."""

from .._lazy import lazy_exports

_EXPORTS = {
    "ARMTrainingConfig": ".arm",
    "load_value_model": ".value",
    "train_arm": ".arm",
    "train_cd_fudge": ".value",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
