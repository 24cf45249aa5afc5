"""vision-plain against transformers on the same random LLaVA checkpoint: image-prompt TTFT
(image decode + preprocessing + vision tower + prefill, to the first token) and decode tok/s.

Two shapes: `tiny` (the tests' model: CLIP hidden 64, 32 px images) and `llava15` (LLaVA-1.5's
CLIP ViT-L/14-336 tower, 576 image tokens, and a 7B-shaped llama cut to 4 layers). Ours runs f32
and with --isq (the language model quantized, on the fused CPU executor); transformers runs f32
(LlavaForConditionalGeneration + its LlavaProcessor, PIL backend). Runs alternate in one process
(the machine is shared); medians.

    .venv/bin/python scripts/bench_vision.py --shape tiny
    .venv/bin/python scripts/bench_vision.py --shape llava15 --isq Q4K --rounds 2 --tokens 16 --no-f32

Measured here (tiny at git 75caec5, llava15 at git 8128b9d; 2 threads on the shared 2-core VM at
load average 6-11, a 300x37 JPEG, medians of 3 (tiny) and 2 (llava15)):
                                   TTFT                       decode
    tiny     ours f32              0.21 s (2.25x)             18.5 tok/s (0.94x)
    tiny     ours --isq Q4K        0.14 s (3.36x)             25.6 tok/s (1.30x)
    tiny     transformers f32      0.48 s                     19.8 tok/s
    llava15  ours --isq Q4K       50.7 s (0.86x)               2.9 tok/s (1.27x; rounds 4.6 and 1.3)
    llava15  transformers f32     43.5 s                       2.3 tok/s
The issue's targets (TTFT >= 1.0x, decode >= 2x with Q4K on the LLaVA-1.5 shape) are not met in
this run. The CLIP-L tower alone takes ~17 s for one 336 px image in both (ours 17.3 s, transformers'
CLIPVisionModel 17.9 s, timed apart); the rest is the ~600-token prefill, where our Q4K kernels
(~33 s) trail transformers' f32 oneDNN matmuls (~26 s) on this machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import vision_models as vm  # noqa: E402

from mistralrs_cli.engine.engine import Engine  # noqa: E402
from mistralrs_cli.loaders.load import load  # noqa: E402
from mistralrs_cli.types import EngineConfig, LoadOptions, SamplingParams, VisionSpec  # noqa: E402
from mistralrs_cli.vision.chat import chat_with_images  # noqa: E402

TEXT = "Describe the picture in detail."


def build(shape: str, path: Path) -> None:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if shape == "tiny":
        vm.save_llava(vm.tiny_llava(0), path)
        return
    vc = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=336, patch_size=14, projection_dim=768)
    tc = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=vm.tm.VOCAB + 1, max_position_embeddings=4096,
                     rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc, image_token_index=vm.tm.VOCAB))
    vm.save_llava(model.eval(), path, crop=336, shortest_edge=336)


def ours(loaded, image: Path, tokens: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(image)}},
                                         {"type": "text", "text": TEXT}]}]
    ids, images = chat_with_images(loaded, msgs, allow_paths=True)
    engine = Engine(loaded, EngineConfig(prefix_cache_n=0))
    t_first = None
    for out in engine.generate(ids, SamplingParams(max_tokens=tokens, ignore_eos=True), images=images):
        if t_first is None:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    return t_first - t0, (tokens - 1) / (t_end - t_first)


def theirs(model, processor, image: Path, tokens: int) -> tuple[float, float]:
    from PIL import Image

    def run(n: int) -> float:
        t0 = time.perf_counter()
        prompt = processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": TEXT}]}], add_generation_prompt=True, tokenize=False)
        enc = processor(text=prompt, images=[Image.open(image)], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=1)
        return time.perf_counter() - t0

    first, whole = run(1), run(tokens)
    return first, (tokens - 1) / (whole - first)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=["tiny", "llava15"], default="tiny")
    ap.add_argument("--isq", default="Q4K")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-f32", action="store_true", help="skip our f32 run (the big shape's memory and time)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlavaForConditionalGeneration

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        t0 = time.perf_counter()
        build(args.shape, path)
        log(f"built in {time.perf_counter() - t0:.0f} s")
        image = path / "image.jpg"
        image.write_bytes(vm.odd_images()["tall"])
        runs = {} if args.no_f32 else {"ours f32": load(VisionSpec(str(path)), LoadOptions(token_source="none"))}
        runs[f"ours --isq {args.isq}"] = load(VisionSpec(str(path)), LoadOptions(token_source="none", isq=args.isq))
        log("ours loaded")
        hf = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        proc = vm.hf_llava_processor(path)
        if args.shape == "llava15":
            proc.patch_size = 14
        res: dict[str, list[tuple[float, float]]] = {k: [] for k in [*runs, "transformers f32"]}
        for _ in range(args.rounds):
            for name, loaded in runs.items():
                res[name].append(ours(loaded, image, args.tokens))
                log(f"{name}: TTFT {res[name][-1][0]:.2f} s, decode {res[name][-1][1]:.2f} tok/s")
            res["transformers f32"].append(theirs(hf, proc, image, args.tokens))
            log(f"transformers: TTFT {res['transformers f32'][-1][0]:.2f} s, decode {res['transformers f32'][-1][1]:.2f} tok/s")
    ref_ttft = statistics.median(t for t, _ in res["transformers f32"])
    ref_dec = statistics.median(d for _, d in res["transformers f32"])
    print(f"{args.shape}, {args.tokens} new tokens, {args.threads} threads, medians of {args.rounds}:")
    for name, rows in res.items():
        ttft, dec = statistics.median(t for t, _ in rows), statistics.median(d for _, d in rows)
        print(f"  {name:22s} TTFT {ttft:7.3f} s ({ref_ttft / ttft:4.2f}x transformers)   "
              f"decode {dec:7.1f} tok/s ({dec / ref_dec:4.2f}x)")


if __name__ == "__main__":
    main()
