#!/usr/bin/env python3
"""Generate the DALL-E tokenizer fixtures for crates/beit/src/tokenizer.rs.

Run with: /work/venv/py/bin/python scripts/gen_tokenizer_fixtures.py
(needs `pip install --no-deps dall-e==0.1 attrs` in that venv; only dall_e.encoder and dall_e.utils are imported.)
Writes into crates/beit/tests/fixtures/tokenizer/:

  <name>.pkl            torch.save(encoder): the whole module pickled, exactly like OpenAI's encoder.pkl
  <name>.safetensors    the same encoder's state dict
  <name>.inputs.npy     float32 (2, 3, 32, 32) pixels in [0, 1]
  <name>.logits.npy     float32 (2, vocab, 4, 4): encoder(map_pixels(inputs))
  <name>.tokens.npy     int64 (2, 4, 4): argmax over the vocabulary

Two encoders: "small" (n_hid 8, 1 block per group, vocab 64) and "deep" (n_hid 4, 2 blocks per group, vocab 16),
so both the identity and the 1x1-conv id_path and several blocks per group are exercised. The published encoder
has n_hid 256 and vocab 8192; dall_e's attrs validators (n_hid >= 64, vocab >= 512) are switched off to build
models small enough to commit (the brief's n_hid 16 would be ~300 KB per copy).
"""
import os

import attr
import numpy as np
import torch
from safetensors.torch import save_file

from dall_e.encoder import Encoder
from dall_e.utils import map_pixels

OUT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "beit", "tests",
                                    "fixtures", "tokenizer"))


def build(name, n_hid, n_blk_per_group, vocab_size, seed):
    torch.manual_seed(seed)
    attr.validators.set_disabled(True)  # the validators only enforce the published sizes' lower bounds
    enc = Encoder(n_hid=n_hid, n_blk_per_group=n_blk_per_group, vocab_size=vocab_size, input_channels=3,
                  device=torch.device("cpu"), requires_grad=False, use_mixed_precision=False)
    attr.validators.set_disabled(False)
    with torch.no_grad():
        # Default init gives zero biases and a small residual (post_gain); random biases and a larger scale make
        # every conv matter and the logits far from flat, so argmax ties cannot happen.
        for pname, p in enc.named_parameters():
            if pname.endswith(".w"):
                p.mul_(1.5)
            else:
                p.copy_(torch.randn_like(p) * 0.3)
    enc.eval()

    # Structured pixels (smooth colour fields plus fine noise) so tokens vary across positions and images; iid
    # noise would look the same everywhere after three max-pools.
    g = torch.Generator().manual_seed(seed + 1)
    coarse = torch.nn.functional.interpolate(torch.randn((2, 3, 4, 4), generator=g) * 2.0, size=(32, 32),
                                             mode="bilinear", align_corners=False)
    x = torch.sigmoid(coarse + 0.3 * torch.randn((2, 3, 32, 32), generator=g)).float().contiguous()
    with torch.no_grad():
        # The output conv sees relu'd features whose mean over positions dwarfs their variation, which would give
        # one token everywhere; fold that mean into the output bias so the logits follow the image content.
        feats = enc.blocks[:-1](map_pixels(x)).relu()
        conv = enc.blocks.output.conv
        mean = feats.mean(dim=(0, 2, 3))
        conv.b.copy_(conv.b - conv.w[:, :, 0, 0] @ mean)
        logits = enc(map_pixels(x))
    tokens = torch.argmax(logits, dim=1)
    top2 = torch.topk(logits, 2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    print(f"{name}: logits {tuple(logits.shape)} std {logits.std().item():.3f} min top-1/top-2 margin {margin:.4f} "
          f"distinct tokens {tokens.unique().numel()}")
    assert margin > 1e-3, "argmax too close to a tie for a parity test"

    torch.save(enc, os.path.join(OUT, f"{name}.pkl"))
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, os.path.join(OUT, f"{name}.safetensors"))
    np.save(os.path.join(OUT, f"{name}.inputs.npy"), x.numpy())
    np.save(os.path.join(OUT, f"{name}.logits.npy"), logits.numpy())
    np.save(os.path.join(OUT, f"{name}.tokens.npy"), tokens.numpy().astype(np.int64))
    print("  state dict:", ", ".join(list(enc.state_dict().keys())[:4]), "...")


def main():
    os.makedirs(OUT, exist_ok=True)
    build("encoder", n_hid=4, n_blk_per_group=2, vocab_size=64, seed=0)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"fixtures: {total / 1024:.0f} KB in {OUT}")


if __name__ == "__main__":
    main()
