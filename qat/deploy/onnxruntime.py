"""ONNX Runtime: the numerical reference."""
from qat.compat import UserError
from qat.deploy.base import Backend, onnx_meta, static_dim


class ONNXRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, path, threads=None, reference=True, names=None, strides=None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("backend 'onnxruntime' needs the onnxruntime package: pip install onnxruntime") from None
        super().__init__(path, names, strides, onnx_meta(path))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if reference:  # the graph run as written: even ORT_ENABLE_BASIC removes and moves Q/DQ nodes
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if threads:
            so.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            first = (str(e).strip().splitlines() or ["?"])[0][:200]
            raise UserError(f"ONNX Runtime could not load {self.path.name}: {first}") from None
        inp = self.session.get_inputs()[0]
        self._in = inp.name
        dims = list(inp.shape)
        if len(dims) == 4:
            self.batch, self.height, self.width = (static_dim(dims[0]), static_dim(dims[2]), static_dim(dims[3]))
        outs = [o.name for o in self.session.get_outputs()]
        self._out = "output0" if "output0" in outs else outs[0]

    def _infer(self, x):
        return self.session.run([self._out], {self._in: x})[0]

