"""Models that leave imgcls: temperature calibration, rejection of unknown images, ONNX/TorchScript export with a parity proof, and the onnxruntime predictor."""
