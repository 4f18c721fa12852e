"""Fine-tuning through the swarm, worked example: teach SmolLM2 to answer "What is 3 plus 4?" as "ANSWER: 7".

Starts a loopback swarm (SmolLM2-135M-Instruct over two servers, 0:15 and 15:30), builds a tiny addition dataset
in code, trains with Adam (only the tuning learns: the servers' blocks and the local head stay frozen, gradients
come back through rpc_backward), prints the loss, shows greedy answers to held-out questions before and after,
saves the result and loads it again into a fresh model. ``--mode``:

    ptune       ``--prompts`` prompt vectors before the first block          -> a .safetensors prompts file
    deep_ptune  plus per-block prompts added before every block               -> a .safetensors prompts file
    lora        LoRA factors (``--rank``, ``--alpha``, ``--targets``) applied by the servers per request
                                                                              -> a PEFT adapter folder

    .venv/bin/python scripts/finetune.py [--mode ptune] [--steps 30] [--lr 0.01] [--prompts 8] [--batch 8]
                                        [--rank 8] [--alpha 16] [--targets q_proj v_proj] [--out PATH]

A LoRA result can be served by name: ``petals-server run ... --adapters NAME=PATH`` (then model id
``smollm2-135m-instruct:NAME`` in the gateway); prompts by the gateway: ``petals-gateway serve --prompts NAME=PATH``.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from swarm.model import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.tuning import IGNORE_INDEX  # noqa: E402
from swarm.weights import resolve_model  # noqa: E402
from tests.e2e.harness import LocalSwarm  # noqa: E402
from tests.helpers import MODEL_CACHE as CACHE  # noqa: E402

MODEL = "smollm2-135m-instruct"


def make_dataset(rng: random.Random, size: int) -> list[tuple[str, str]]:
    """(question, answer) pairs: small additions, answered in a fixed format the model does not use by itself."""
    pairs = []
    for _ in range(size):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        pairs.append((f"Question: What is {a} plus {b}?\nReply:", f" ANSWER: {a + b}"))
    return pairs


def make_batch(tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids [B, S] and labels [B, S] that count only the answer (and its end-of-text)."""
    rows, label_rows = [], []
    for question, answer in pairs:
        q = tokenizer(question, add_special_tokens=False).input_ids
        a = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append(q + a)
        label_rows.append([IGNORE_INDEX] * len(q) + a)
    width = max(map(len, rows))
    # Causal attention: right padding never changes the real positions, so no attention mask is needed.
    input_ids = torch.tensor([r + [tokenizer.eos_token_id] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in label_rows])
    return input_ids, labels


def answer(model, tokenizer, question: str, max_new_tokens: int = 10) -> str:
    input_ids = tokenizer(question, add_special_tokens=False, return_tensors="pt").input_ids
    tokens = model.generate(input_ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(tokens[0, input_ids.shape[1] :], skip_special_tokens=True).strip()


def show_answers(title: str, model, tokenizer, questions: list[str]) -> None:
    print(f"--- {title}")
    for question in questions:
        print(f"  {question.splitlines()[0]!r:40} -> {answer(model, tokenizer, question)!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["ptune", "deep_ptune", "lora"], default="ptune")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=None, help="default: 0.01 for prompts, 1e-3 for LoRA")
    parser.add_argument("--prompts", type=int, default=8, help="number of trainable prompt vectors (pre_seq_len)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha / rank)")
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"], help="LoRA target linears")
    parser.add_argument("--out", type=Path, default=None, help="default: artifacts/finetune_<mode>[.safetensors]")
    args = parser.parse_args()
    lr = args.lr if args.lr is not None else (1e-3 if args.mode == "lora" else 0.01)
    out = args.out or REPO / "artifacts" / (f"finetune_{args.mode}" + ("" if args.mode == "lora" else ".safetensors"))
    if args.mode == "lora":
        tuning = {"lora": {"rank": args.rank, "alpha": args.alpha, "targets": tuple(args.targets)}}
        saved = {"lora": {"path": out}}
    else:
        tuning = {"pre_seq_len": args.prompts}
        saved = {"prompts_path": out}
    torch.manual_seed(0)
    rng = random.Random(0)
    train, held_out = make_dataset(rng, 256), [q for q, _ in make_dataset(random.Random(1), 4)]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(MODEL, CACHE).folder)

    swarm = LocalSwarm(Path(tempfile.mkdtemp(prefix="finetune-")), CACHE)
    model = loaded = None
    try:
        swarm.start_bootstrap()
        for server in [swarm.start_server(MODEL, span, wait=False) for span in ("0:15", "15:30")]:
            swarm.wait_ready(server)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            MODEL, swarm.initial_peers, cache_dir=CACHE, tuning_mode=args.mode, **tuning
        )
        show_answers("before training", model, tokenizer, held_out)

        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        shapes = ", ".join(f"{name} {tuple(p.shape)}" for name, p in trainable.items())
        print(f"trainable parameters: {sum(p.numel() for p in trainable.values())} ({shapes})")
        optimizer = torch.optim.Adam(trainable.values(), lr=lr)
        began = time.perf_counter()
        for step in range(args.steps):
            input_ids, labels = make_batch(tokenizer, rng.sample(train, args.batch))
            loss = model(input_ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()  # through rpc_backward on both servers, back to the prompts
            optimizer.step()
            print(f"step {step + 1:3d}  loss {loss.item():.4f}  ({time.perf_counter() - began:.0f} s)", flush=True)

        show_answers("after training", model, tokenizer, held_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.mode == "lora":
            model.tuning.save_pretrained(out, base_model=MODEL)  # PEFT format
        else:
            model.tuning.save(out)
        print(f"saved the {args.mode} result to {out}")

        loaded = AutoDistributedModelForCausalLM.from_pretrained(
            MODEL, swarm.initial_peers, cache_dir=CACHE, tuning_mode=args.mode, **saved
        )
        show_answers("a fresh model with the saved result", loaded, tokenizer, held_out)
    finally:
        for m in (model, loaded):
            if m is not None:
                m.shutdown()
        swarm.stop()


if __name__ == "__main__":
    main()
