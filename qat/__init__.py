"""yolov9-qat: quantization-aware training of YOLOv9 / GELAN models that deploy as real INT8 engines.

One module per stage (DESIGN.md section 1); data flows one way:
    settings   QuantSettings: weight bits, calibration method, layers kept float
    quantize   insert modelopt Q/DQ quantizers, one quantizer per shared-scale group (rules)
    calibrate  activation ranges -> amax (max / histogram), merged across DDP ranks
    finetune   QAT: self-distillation against the FP32 model and/or the detection loss
    checkpoint QAT checkpoints through the safe loader
    pipeline   the stages end to end (train_qat.py, train.py --qat); sensitivity, speed
    export / graph / lint / deploy   ONNX Q/DQ, graph pass, TensorRT rule check, runtimes
Importing the package imports nothing heavy; modelopt is loaded by qat.modules only.
"""
