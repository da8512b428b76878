"""Peer for `bench_train`: PyTorch's `nn.Transformer` with the same embeddings and head.

Optional: needs `pip install -e .[bench]` (a CPU build of torch; on a GPU machine, a CUDA build).
Runs on CUDA when asked (`--device cuda`), with bf16 matmuls under `torch.autocast`, and
float32 matmuls in TF32 there, as JAX's default precision computes them.

It is our model, not `nn.Transformer`'s defaults: dropout only where the paper (and ours)
puts it, on each sub-layer's output and on the embeddings, not on the attention weights
(`attention_dropout_rate`) nor between the feed-forward's two layers; no LayerNorm after
the last layer of each stack (post-norm needs none); our LayerNorm epsilon; and optax's
AdamW weight decay (1e-4). So each framework does the same work per step.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from benchmarks.common import positive_int, time_steps
from flax_transformer import TransformerConfig
from flax_transformer.kernels import sinusoidal_positions


def _activation(name: str) -> str:
    if name not in ("relu", "gelu"):  # nn.Transformer takes these two by name
        raise ValueError(f"the torch peer has no activation {name!r}; use relu or gelu")
    return name


def build_torch_step(c: TransformerConfig, batch: int, src_len: int, tgt_len: int, *,
                     label_smoothing: float = 0.1, seed: int = 0, device: str = "cpu"):
    """A zero-argument callable running one AdamW train step of `nn.Transformer` on fixed
    random token batches on `device` ("cpu" or "cuda"), and the model's parameter count.

    The step returns the loss as a device tensor, without waiting for it (as JAX's dispatch
    does not): the caller synchronises once per timed block."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class TorchPeer(nn.Module):
        def __init__(self):
            super().__init__()
            self.src_embed = nn.Embedding(c.src_vocab_size, c.d_model)
            self.tgt_embed = nn.Embedding(c.tgt_vocab_size, c.d_model)
            self.transformer = nn.Transformer(
                c.d_model, c.num_heads, c.num_encoder_layers, c.num_decoder_layers, c.d_ff,
                dropout=c.dropout_rate, batch_first=True, layer_norm_eps=c.layer_norm_epsilon,
                norm_first=c.norm == "pre", activation=_activation(c.activation))
            stacks = (self.transformer.encoder, self.transformer.decoder)
            for stack in stacks:
                stack.norm = None if c.norm == "post" else stack.norm
                for layer in stack.layers:
                    layer.dropout = nn.Identity()  # the feed-forward's inner dropout
                    for attention in ("self_attn", "multihead_attn"):
                        if hasattr(layer, attention):  # read at every call
                            getattr(layer, attention).dropout = c.attention_dropout_rate
            self.dropout = nn.Dropout(c.dropout_rate)
            self.register_buffer("positions",
                                 torch.from_numpy(sinusoidal_positions(c.max_len, c.d_model)))

        def embed(self, tokens, table):
            return self.dropout(table(tokens) * math.sqrt(c.d_model)
                                + self.positions[: tokens.shape[1]])

        def forward(self, src, tgt):
            causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], device=tgt.device)
            y = self.transformer(self.embed(src, self.src_embed), self.embed(tgt, self.tgt_embed),
                                 tgt_mask=causal, src_key_padding_mask=src == 0,
                                 memory_key_padding_mask=src == 0)
            return y @ self.tgt_embed.weight.T

    model = TorchPeer().to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9,
                                  weight_decay=1e-4)  # optax.adamw's default
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 dots as JAX's default computes
    loss_fn = nn.CrossEntropyLoss(ignore_index=0, label_smoothing=label_smoothing)
    rng = np.random.default_rng(seed)
    src = torch.from_numpy(rng.integers(4, c.src_vocab_size, (batch, src_len))).to(device)
    tgt = torch.from_numpy(rng.integers(4, c.tgt_vocab_size, (batch, tgt_len + 1))).to(device)

    low_precision = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(c.dtype)

    def step():
        optimizer.zero_grad(set_to_none=True)
        # float32 parameters, low-precision matmuls: torch's mixed precision, like dtype=bf16
        with torch.autocast(device, dtype=low_precision, enabled=low_precision is not None):
            logits = model(src, tgt[:, :-1])
        logits = logits.float()
        loss = loss_fn(logits.reshape(-1, logits.shape[-1]), tgt[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step, sum(p.numel() for p in model.parameters())


def _wait(loss) -> None:
    loss.item()  # a device tensor: waits for the device


def main(argv=None) -> None:
    """Worker: build the peer, warm it up, and time blocks of `steps` train steps.

    Alone it times `repeats` blocks and prints {"seconds": [...], "host_seconds": [...],
    "params": n, ...}. With `--serve` (how `bench_train` runs it) it prints that line without
    times as soon as it is warm, then times one block per line read from stdin and answers
    each with {"seconds": s, "host_seconds": h}, until stdin closes: so its blocks take turns
    with the JAX frameworks' in the parent and drift on the host hits all of them alike.

    Torch runs in its own process: inside a process whose XLA thread pool is active, torch's
    OpenMP workers are starved and every parallel op stalls for milliseconds.
    """
    import argparse
    import json

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="TransformerConfig as JSON")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--length", type=int, required=True)
    parser.add_argument("--steps", type=positive_int, default=3)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--serve", action="store_true",
                        help="time one block per line read from stdin (see above)")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("torch peer: --device cuda but this torch build sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TransformerConfig.from_dict(json.loads(args.config))
    step, count = build_torch_step(config, args.batch, args.length, args.length,
                                   device=args.device)
    for _ in range(3):
        step().item()  # .item() waits for the device
    about = {"params": count, "threads": torch.get_num_threads(), "device": args.device}
    if args.serve:
        print(json.dumps(about), flush=True)
        for _ in sys.stdin:
            total, host = time_steps(step, args.steps, wait=_wait)
            print(json.dumps({"seconds": total, "host_seconds": host}), flush=True)
        return
    blocks = [time_steps(step, args.steps, wait=_wait) for _ in range(args.repeats)]
    print(json.dumps({"seconds": [total for total, _ in blocks],
                      "host_seconds": [host for _, host in blocks], **about}))


if __name__ == "__main__":
    main()
