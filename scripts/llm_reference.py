#!/usr/bin/env python3
"""Write a reference dump for `kiln verify` with transformers.

For each prompt: the prompt's token ids, transformers' greedy continuation and
the raw logits at every step (step 0 = after the prompt), in the layout
`kiln verify --reference DIR` reads (the same as fixtures/llm/*/reference):

    DIR/index.json              {"model": ..., "versions": ..., "cases": [
                                   {"name", "prompt", "input_ids", "output_ids", "logits"}]}
    DIR/references.safetensors  "<case>.input_ids" int64 [n], "<case>.output_ids" int64 [steps],
                                "<case>.logits" float32 [steps, vocab]

Usage (CPU is fine; no network is needed for a local folder):

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch transformers safetensors
    /tmp/refvenv/bin/python scripts/llm_reference.py MODEL_DIR OUT_DIR \
        --prompt "The capital of France is" --chat "Say hello in French." --steps 16
    kiln verify MODEL_DIR --reference OUT_DIR      # or a GGUF of the same weights

`--chat TEXT` renders TEXT as a user message through the model's chat
template (add_generation_prompt=True); `--prompt TEXT` is tokenized as plain
text with the tokenizer's special tokens (BOS), as Kiln's completions do. EOS
is ignored so every case has `--steps` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a transformers model folder")
    parser.add_argument("out", type=Path, help="the dump folder to write")
    parser.add_argument("--prompt", action="append", default=[], help="a plain-text prompt (repeatable)")
    parser.add_argument("--chat", action="append", default=[], help="a user message for the chat template (repeatable)")
    parser.add_argument("--steps", type=int, default=16, help="greedy steps per case")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    if not args.prompt and not args.chat:
        parser.error("give at least one --prompt or --chat")

    torch.set_grad_enabled(False)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=getattr(torch, args.dtype), attn_implementation="eager"
    ).eval()

    cases, tensors = [], {}
    inputs = [("prompt", p, tokenizer(p, return_tensors="pt").input_ids) for p in args.prompt]
    for text in args.chat:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(rendered, add_special_tokens=False, return_tensors="pt").input_ids
        inputs.append(("chat", text, ids))
    for i, (kind, text, ids) in enumerate(inputs):
        name = f"{kind}{i}"
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=args.steps,
            min_new_tokens=args.steps, eos_token_id=None, pad_token_id=tokenizer.pad_token_id or 0,
            output_logits=True, return_dict_in_generate=True,
        )
        generated = out.sequences[0, ids.shape[1]:]
        tensors[f"{name}.input_ids"] = ids[0].to(torch.int64).contiguous()
        tensors[f"{name}.output_ids"] = generated.to(torch.int64).contiguous()
        tensors[f"{name}.logits"] = torch.stack([l[0] for l in out.logits]).float().contiguous()
        cases.append({
            "name": name, kind: text, "input_ids": f"{name}.input_ids",
            "output_ids": f"{name}.output_ids", "logits": f"{name}.logits",
            "output_text": tokenizer.decode(generated, skip_special_tokens=True),
        })
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.out / "references.safetensors")
    index = {
        "model": str(args.model),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "dtype": args.dtype,
        "cases": cases,
    }
    (args.out / "index.json").write_text(json.dumps(index, indent=1, ensure_ascii=False))
    print(f"wrote {len(cases)} cases to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
