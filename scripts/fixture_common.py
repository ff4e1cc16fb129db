"""What the fixture generators share: seeded random weights far from initialization, and seeded inputs."""
import torch


def randomize(model, seed):
    """Seeded random weights far from the initial ones (zeros and ones hide bugs), for transformers' and timm's
    parameter names alike."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            leaf = name.rsplit(".", 1)[-1]
            is_norm = "layernorm" in name or any(c in ("norm", "norm1", "norm2", "fc_norm") for c in name.split("."))
            if is_norm and leaf == "weight":
                p.copy_(1.0 + 0.2 * noise)
            elif "relative_position_bias_table" in name or "position_embeddings" in name or name == "pos_embed":
                p.copy_(0.5 * noise)
            elif "lambda_" in name or "gamma_" in name:
                p.copy_(0.5 + 0.3 * noise)
            else:
                p.copy_(0.3 * noise)
        # BatchNorm statistics: fresh ones (0 and 1) would hide a wrong normalization.
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def pixels(seed, batch, channels, height, width):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, height, width, generator=g)
