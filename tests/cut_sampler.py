"""An independent transcription of CUT's patch sampler, the oracle of tests/test_sample.py.

Written from reading taesungp/contrastive-unpaired-translation ``models/networks.py``
(``Normalize``, ``init_weights``/``init_net``, ``PatchSampleF``), with plain torch and
explicit loops, sharing no code with pdml: the rows are gathered one pixel at a time,
the MLPs are plain ``nn.Linear`` stacks applied to the gathered rows, and the norm is
CUT's ``x.pow(2).sum(1).pow(1/2)``. CUT's ``.cuda()`` in ``create_mlp`` becomes "the
features' device" so it runs on CPU.
"""
import torch
from torch import nn
from torch.nn import init


def cut_normalise(x):
    """CUT's Normalize(2): the 2-norm over dim 1, plus 1e-7."""
    norm = x.pow(2).sum(1, keepdim=True).pow(1.0 / 2)
    return x.div(norm + 1e-7)


def cut_init_weights(net, init_type, init_gain):
    def visit(m):
        name = m.__class__.__name__
        if hasattr(m, "weight") and (name.find("Conv") != -1 or name.find("Linear") != -1):
            if init_type == "normal":
                init.normal_(m.weight.data, 0.0, init_gain)
            elif init_type == "xavier":
                init.xavier_normal_(m.weight.data, gain=init_gain)
            elif init_type == "kaiming":
                init.kaiming_normal_(m.weight.data, a=0, mode="fan_in")
            elif init_type == "orthogonal":
                init.orthogonal_(m.weight.data, gain=init_gain)
            else:
                raise NotImplementedError(init_type)
            if hasattr(m, "bias") and m.bias is not None:
                init.constant_(m.bias.data, 0.0)
        elif name.find("BatchNorm2d") != -1:
            init.normal_(m.weight.data, 1.0, init_gain)
            init.constant_(m.bias.data, 0.0)

    net.apply(visit)


class CutPatchSampleF(nn.Module):
    def __init__(self, use_mlp=False, init_type="normal", init_gain=0.02, nc=256):
        super().__init__()
        self.use_mlp = use_mlp
        self.nc = nc
        self.mlp_init = False
        self.init_type = init_type
        self.init_gain = init_gain

    def create_mlp(self, feats):
        for mlp_id, feat in enumerate(feats):
            input_nc = feat.shape[1]
            mlp = nn.Sequential(nn.Linear(input_nc, self.nc), nn.ReLU(), nn.Linear(self.nc, self.nc))
            setattr(self, "mlp_%d" % mlp_id, mlp.to(feat.device))
        cut_init_weights(self, self.init_type, self.init_gain)
        self.mlp_init = True

    def forward(self, feats, num_patches=64, patch_ids=None):
        return_ids, return_feats = [], []
        if self.use_mlp and not self.mlp_init:
            self.create_mlp(feats)
        for feat_id, feat in enumerate(feats):
            B, C, H, W = feat.shape
            if num_patches > 0:
                if patch_ids is not None:
                    patch_id = patch_ids[feat_id]
                else:
                    patch_id = torch.randperm(H * W, device=feats[0].device)
                    patch_id = patch_id[:int(min(num_patches, patch_id.shape[0]))]
                # feat.permute(0, 2, 3, 1).flatten(1, 2)[:, patch_id, :].flatten(0, 1), one row at a time
                rows = []
                for b in range(B):
                    for p in patch_id.tolist():
                        rows.append(feat[b, :, p // W, p % W])
                x_sample = torch.stack(rows)
            else:
                pixels = []
                for b in range(B):
                    pixels.append(torch.stack([feat[b, :, p // W, p % W] for p in range(H * W)]))
                x_sample = torch.stack(pixels)  # [B, H*W, C]
                patch_id = []
            if self.use_mlp:
                x_sample = getattr(self, "mlp_%d" % feat_id)(x_sample)
            return_ids.append(patch_id)
            x_sample = cut_normalise(x_sample)
            if num_patches == 0:
                x_sample = x_sample.permute(0, 2, 1).reshape([B, x_sample.shape[-1], H, W])
            return_feats.append(x_sample)
        return return_feats, return_ids
