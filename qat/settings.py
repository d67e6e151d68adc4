"""QuantSettings: how a model is quantized, as plain types (saved in QAT checkpoints via `asdict`)."""
import re
from dataclasses import asdict, dataclass, field, fields

from qat.compat import UserError

CALIB_METHODS = ("auto", "max", "percentile", "mse", "entropy")  # auto: chosen by PTQ mAP (qat.pipeline)
WEIGHT_BITS = (7, 8)
RESIDUAL_QUANT = ("both", "shortcut")


@dataclass
class QuantSettings:
    """weight_bits: 8, or 7 for CPUs without VNNI (DESIGN.md section 5; exported as INT8 with |q| <= 63).
    calib_method: activation calibration, 'max' or a histogram method ('percentile', 'mse', 'entropy'), or
    'auto' (histograms kept; qat.pipeline picks the rule by PTQ mAP on a selection split and stores it here).
    percentile: for 'percentile'. no_last_layer: keep the detection head (model.model[-1]) in float.
    skip_layers: regexes searched (re.search) in quantizer names such as
    'model.3.cv4.conv.input_quantizer', so '^model\\.22\\.' or 'model\\.3\\.cv4' keeps every quantizer
    of those modules disabled (in float). Not modelopt's wildcard quantizer config
    (`set_quantizer_by_cfg`): it fnmatches `named_modules()`, which lists a shared quantizer under one
    name only, and disables the matched object, un-quantizing the neighbours in its group; a skipped
    slot here gets its own disabled quantizer (qat.quantize). Regexes are also what checkpoints store.
    residual_quant: the residual Add of RepNBottleneck: 'both' inputs quantized (one scale), or only the
    'shortcut' input (TensorRT's Q/DQ placement guide: the Add then fuses into the convolution that
    produces the other input). Which is faster is measured on a GPU (scripts/gpu_check.sh)."""
    weight_bits: int = 8
    calib_method: str = "max"
    percentile: float = 99.99
    no_last_layer: bool = False
    skip_layers: list = field(default_factory=list)
    residual_quant: str = "both"

    def __post_init__(self):
        self.validate()

    def validate(self):
        if self.calib_method not in CALIB_METHODS:
            raise UserError(f"--calib-method '{self.calib_method}' is unknown: use one of {', '.join(CALIB_METHODS)}")
        if int(self.weight_bits) != self.weight_bits or int(self.weight_bits) not in WEIGHT_BITS:
            raise UserError(f"--weight-bits {self.weight_bits} is not supported: use 8, or 7 for CPUs without VNNI")
        self.weight_bits = int(self.weight_bits)
        if not 0.0 < float(self.percentile) <= 100.0:
            raise UserError(f"--percentile {self.percentile} must be in (0, 100], e.g. 99.99")
        self.percentile = float(self.percentile)
        self.no_last_layer = bool(self.no_last_layer)
        if self.residual_quant not in RESIDUAL_QUANT:
            raise UserError(f"--residual-quant '{self.residual_quant}' is unknown: use one of {', '.join(RESIDUAL_QUANT)}")
        if isinstance(self.skip_layers, str):
            self.skip_layers = [self.skip_layers]
        self.skip_layers = [str(s) for s in (self.skip_layers or [])]
        for pattern in self.skip_layers:
            try:
                re.compile(pattern)
            except re.error as e:
                raise UserError(f"--skip-layers '{pattern}' is not a valid regular expression ({e})") from None
        return self

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """From a checkpoint's dict; keys this version does not know are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(d or {}).items() if k in names})

    def skips(self, module_name):
        """True when a module of this name stays in floating point."""
        return any(re.search(p, module_name) for p in self.skip_layers)
