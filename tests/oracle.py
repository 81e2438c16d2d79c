"""Independent float64 oracles of the losses, written from the formulas of docs/ops.md.

Deliberately not sharing code with pdml.reference: explicit per-row sums,
explicit max-shifted logsumexp, the diagonal replaced arithmetically.
"""
import torch


def cut_normalise(x):
    """CUT's Normalize: x / (sqrt(sum x²) + 1e-7), row-wise, float64."""
    return x / (x.pow(2).sum(-1, keepdim=True).sqrt() + 1e-7)


def gather_map(fmap, ids):
    """[B, C, H, W] -> [B·N, C], row b*N + i = fmap[b, :, ids[i]]."""
    B, C = fmap.shape[:2]
    flat = fmap.reshape(B, C, -1)
    rows = [flat[b, :, int(i)] for b in range(B) for i in ids]
    return torch.stack(rows)


def _split(rows, groups):
    per = rows.shape[0] // groups
    return [rows[g * per:(g + 1) * per] for g in range(groups)]


def _with_diag(s, value):
    n = s.shape[0]
    eye = torch.eye(n, dtype=s.dtype)
    return s * (1 - eye) + value * eye


def nce_rows(q, k, tau, groups):
    """Per-row PatchNCE of normalised rows [R, C] (float64), k detached."""
    k = k.detach()
    out = []
    for qg, kg in zip(_split(q, groups), _split(k, groups)):
        s = qg @ kg.T
        pos = torch.einsum("ic,ic->i", qg, kg)
        neg = _with_diag(s, -10.0)
        logits = torch.cat([pos[:, None], neg], dim=1) / tau
        m = logits.max(dim=1, keepdim=True).values.detach()
        lse = m[:, 0] + torch.log(torch.exp(logits - m).sum(dim=1))
        out.append(lse - logits[:, 0])
    return torch.cat(out)


def metric_rows(q, k, tau, groups):
    """The paper's metric loss of normalised rows [R, C] (float64), no detach."""
    dim = q.shape[1]
    pos_terms, kk_terms, qq_terms = [], [], []
    for qg, kg in zip(_split(q, groups), _split(k, groups)):
        pos_terms.append(torch.exp(torch.einsum("ic,ic->i", qg, kg) / tau))
        kk_terms.append(torch.exp(_with_diag(kg @ kg.T, -10.0) / tau).reshape(-1))
        qq_terms.append(torch.exp(_with_diag(qg @ qg.T, -10.0) / tau).reshape(-1))
    pos, kk, qq = (torch.cat(t) for t in (pos_terms, kk_terms, qq_terms))
    return (-pos.sum() / pos.numel() + kk.sum() / kk.numel() + qq.sum() / qq.numel()) / dim


def groups_of(batch, negatives):
    return batch if negatives == "image" else 1


def nce_map(fq, fk, ids, tau, negatives):
    q = cut_normalise(gather_map(fq.double(), ids))
    k = cut_normalise(gather_map(fk.double(), ids))
    return nce_rows(q, k, tau, groups_of(fq.shape[0], negatives))


def metric_map(fq, fk, ids, tau, negatives):
    q = cut_normalise(gather_map(fq.double(), ids))
    k = cut_normalise(gather_map(fk.double(), ids))
    return metric_rows(q, k, tau, groups_of(fq.shape[0], negatives))


def similarity_map(fq, fk, ids):
    B = fq.shape[0]
    q = cut_normalise(gather_map(fq.double(), ids)).reshape(B, len(ids), -1)
    k = cut_normalise(gather_map(fk.double(), ids)).reshape(B, len(ids), -1)
    return torch.einsum("bic,bjc->bij", q, k)
