"""Fine-tune a small transformers model with the MAM adapter (prefix at every attention + scaled parallel adapter
at every FFN) and report trainable parameters, loss and throughput.

Runs anywhere, no download: the default model is a tiny randomly initialised Llama-layout decoder built from a
config, trained on a synthetic next-token task (counting sequences: each token is the previous one plus one,
modulo the vocabulary), which the frozen random model cannot solve and the adapter learns.

    python examples/finetune_mam.py --threads 1          # tiny Llama on the CPU: a few seconds
    python examples/finetune_mam.py --arch gpt2 --steps 100
    python examples/finetune_mam.py --pretrained /path/to/local/model --device cuda --bf16
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import fastpeft


def tiny_model(arch: str, hidden: int, layers: int, vocab: int):
    heads = max(hidden // 32, 2)
    if arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1), max_position_embeddings=512,
        )
    elif arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512)
    else:
        raise ValueError(f"--arch must be 'llama' or 'gpt2' for a tiny model, got {arch!r}")
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def counting_batch(batch: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    return (start + torch.arange(length)) % vocab


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="llama", help="tiny model layout: llama or gpt2")
    parser.add_argument("--pretrained", default=None, help="a local causal LM directory instead of a tiny model")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--r", type=int, default=None, help="adapter bottleneck (default: the preset's 512)")
    parser.add_argument("--prefix-length", type=int, default=None, help="prefix length (default: the preset's 30)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (1 avoids oversubscribing a busy CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.pretrained:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.pretrained, attn_implementation="sdpa")
        vocab = model.config.vocab_size
    else:
        model = tiny_model(args.arch, args.hidden, args.layers, args.vocab)
        vocab = args.vocab
    overrides = {k: v for k, v in (("r", args.r), ("length", args.prefix_length)) if v is not None}
    fastpeft.apply(model, fastpeft.get_config("mam", **overrides))
    model.to(args.device).train()
    fastpeft.print_trainable_parameters(model)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    generator = torch.Generator().manual_seed(0)
    losses, tokens, start = [], 0, None
    for step in range(1, args.steps + 1):
        ids = counting_batch(args.batch_size, args.seq_len, vocab, generator).to(args.device)
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # .item() synchronises, so the timing below is honest
        if step == 1:
            start = time.perf_counter()  # the first step (allocation, lazy init) is not timed
        else:
            tokens += ids.numel()
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step:4d}  loss {losses[-1]:.4f}")
    elapsed = time.perf_counter() - start if start is not None else 0.0
    timed = args.steps - 1
    throughput = {
        "steps_per_s": timed / elapsed if elapsed else float("nan"),
        "tokens_per_s": tokens / elapsed if elapsed else float("nan"),
    }
    print(
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f} | {throughput['steps_per_s']:.2f} steps/s, "
        f"{throughput['tokens_per_s']:,.0f} tokens/s over {timed} steps on {args.device}"
        f"{' (bf16 autocast)' if args.bf16 else ''}"
    )
    return {"losses": losses, **throughput, "trainable": fastpeft.trainable_parameters(model)}


if __name__ == "__main__":
    main()
