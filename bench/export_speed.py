"""CPU inference img/s of an exported ONNX file in onnxruntime beside the same run in PyTorch.

Both sides compute the same thing on the same uint8 test images of the run: normalisation, the model with
batch norms folded, the flip average when the run uses TTA, temperature and softmax. PyTorch runs the way
``imgcls predict`` runs (``engine.evaluate.predict_logits``, the run's inference precision: bf16 autocast for
Lite0 at 150 px on a bf16-capable CPU) and again in fp32, the precision of the exported graph. The three
alternate in chunks over several rounds; medians are quoted, with ratios to PyTorch. Both use the same
number of threads. Prints a table and one final JSON line; asserts nothing.

    python bench/export_speed.py RUN [--onnx MODEL.onnx] [--n 256] [--batch 16] [--rounds 3]

Without ``--onnx``, RUN/model.onnx is used (``imgcls export RUN`` writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("IMGCLS_QUIET", "1")

import onnxruntime as ort  # noqa: E402

from imgcls.data import prepare  # noqa: E402
from imgcls.engine.evaluate import inference_model, predict_logits  # noqa: E402
from imgcls.engine.inference import load_run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--onnx", type=Path, default=None)
    ap.add_argument("--n", type=int, default=256, help="test images per measurement")
    ap.add_argument("--batch", type=int, default=16, help="images per forward call, both sides")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    run = load_run(args.run, device="cpu")
    split = prepare(run.config).test
    images = split.images[: args.n].contiguous()
    n = len(images)
    model = inference_model(run.model, images, mean=run.mean, std=run.std, device=run.device)
    threads = torch.get_num_threads()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(args.onnx or args.run / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    t = run.calibration.temperature

    def torch_path(precision: str):
        def go():
            raw = predict_logits(model, images, mean=run.mean, std=run.std, device=run.device,
                                 precision=precision, batch_size=args.batch, tta=run.config.tta)
            return (raw / t).softmax(1)
        return go

    def onnx_path():
        return torch.cat([torch.from_numpy(sess.run(["probabilities"], {"images": images[i : i + args.batch].numpy()})[0])
                          for i in range(0, n, args.batch)])

    paths = {f"pytorch ({run.precision}, as imgcls predict)": torch_path(run.precision),
             "pytorch (fp32)": torch_path("fp32"), "onnxruntime (fp32)": onnx_path}
    for fn in paths.values():  # warm-up: first-call allocation and kernel selection
        fn()
    rates: dict[str, list[float]] = {k: [] for k in paths}
    outs = {}
    for _ in range(args.rounds):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            rates[name].append(n / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    ref = med["pytorch (fp32)"]
    print(f"{run.config.model} at {run.img_size}px, tta={run.config.tta}, {n} test images, batch {args.batch}, {threads} threads, "
          f"median of {args.rounds} alternating rounds")
    for name, r in med.items():
        print(f"  {name:40s} {r:8.1f} img/s   x{r / ref:.2f} vs PyTorch fp32")
    names = list(paths)
    agree = float((outs[names[2]].argmax(1) == outs[names[1]].argmax(1)).float().mean())
    print(f"  top-1 agreement onnxruntime vs PyTorch fp32 on these images: {agree:.2%}")
    print(json.dumps({
        "bench": "export_speed", "model": run.config.model, "img_size": run.img_size, "tta": run.config.tta,
        "n": n, "batch": args.batch, "threads": threads, "rounds": args.rounds,
        "pytorch_predict_precision": run.precision,
        "img_per_s": {"pytorch_predict": med[names[0]], "pytorch_fp32": med[names[1]], "onnxruntime": med[names[2]]},
        "onnxruntime_over_pytorch_fp32": med[names[2]] / ref, "onnxruntime_over_pytorch_predict": med[names[2]] / med[names[0]],
        "top1_agreement": agree,
    }))


if __name__ == "__main__":
    main()
