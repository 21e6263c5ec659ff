"""Parameter shapes of well-known GANs, generated from their layer layouts (no download), for
the benchmarks of the gradient-list ops (``bench_aw.py``, ``bench_iga.py``): lists of tensor
shapes, one per parameter, in the order the models register them."""

from __future__ import annotations

from collections.abc import Sequence


def _conv(cin, cout, k, bias=True):
    return [(cout, cin, k, k)] + ([(cout,)] if bias else [])


def _convt(cin, cout, k, bias=True):
    return [(cin, cout, k, k)] + ([(cout,)] if bias else [])


def _linear(cin, cout, bias=True):
    return [(cout, cin)] + ([(cout,)] if bias else [])


def _bn(c):
    return [(c,), (c,)]


def sngan_d(ch: int = 128) -> list[tuple]:
    """SN-GAN ResNet discriminator, CIFAR-10 (Miyato et al. 2018), ~1.05M parameters."""
    s = _conv(3, ch, 3) + _conv(ch, ch, 3) + _conv(3, ch, 1)             # optimized block
    s += _conv(ch, ch, 3) + _conv(ch, ch, 3) + _conv(ch, ch, 1)          # downsampling block
    for _ in range(2):
        s += _conv(ch, ch, 3) + _conv(ch, ch, 3)
    return s + _linear(ch, 1)


def sngan_g(ch: int = 256, z: int = 128) -> list[tuple]:
    """SN-GAN ResNet generator, CIFAR-10, ~4.3M parameters."""
    s = _linear(z, 4 * 4 * ch)
    for _ in range(3):
        s += _bn(ch) + _conv(ch, ch, 3) + _bn(ch) + _conv(ch, ch, 3) + _conv(ch, ch, 1)
    return s + _bn(ch) + _conv(ch, 3, 3)


def dcgan_d(ndf: int = 64) -> list[tuple]:
    """DCGAN discriminator, 64x64 (Radford et al.; the PyTorch example), ~2.8M parameters."""
    s = _conv(3, ndf, 4, bias=False)
    for i in range(3):
        s += _conv(ndf * 2**i, ndf * 2 ** (i + 1), 4, bias=False) + _bn(ndf * 2 ** (i + 1))
    return s + _conv(ndf * 8, 1, 4, bias=False)


def dcgan_g(ngf: int = 64, nz: int = 100) -> list[tuple]:
    """DCGAN generator, 64x64, ~3.6M parameters."""
    s = _convt(nz, ngf * 8, 4, bias=False) + _bn(ngf * 8)
    for i in (8, 4, 2):
        s += _convt(ngf * i, ngf * i // 2, 4, bias=False) + _bn(ngf * i // 2)
    return s + _convt(ngf, 3, 4, bias=False)


def _attention(c):
    return (_conv(c, c // 8, 1, False) + _conv(c, c // 8, 1, False) + _conv(c, c // 2, 1, False)
            + _conv(c // 2, c, 1, False) + [()])


def biggan_d(ch: int = 64, n_classes: int = 1000) -> list[tuple]:
    """BigGAN discriminator, 128x128 (Brock et al.; BigGAN-PyTorch layout, ch=64), ~39M."""
    chans = [3, ch, 2 * ch, 4 * ch, 8 * ch, 16 * ch, 16 * ch]
    s = []
    for i in range(6):
        cin, cout = chans[i], chans[i + 1]
        s += _conv(cin, cout, 3) + _conv(cout, cout, 3)
        if cin != cout or i < 5:                    # learnable shortcut where it downsamples
            s += _conv(cin, cout, 1)
        if i == 0:
            s += _attention(cout)                   # attention at 64x64
    return s + _linear(16 * ch, 1) + [(n_classes, 16 * ch)]


def biggan_g(ch: int = 64, n_classes: int = 1000, shared: int = 128, z_chunk: int = 20):
    """BigGAN generator, 128x128 (ch=64, hierarchical z, shared class embedding), ~32M."""
    cond = shared + z_chunk
    chans = [16 * ch, 16 * ch, 8 * ch, 4 * ch, 2 * ch, ch]
    s = [(n_classes, shared)] + _linear(z_chunk, 16 * ch * 16)
    for i in range(5):
        cin, cout = chans[i], chans[i + 1]
        s += _linear(cond, cin, False) * 2 + _conv(cin, cout, 3)
        s += _linear(cond, cout, False) * 2 + _conv(cout, cout, 3) + _conv(cin, cout, 1)
        if i == 3:
            s += _attention(cout)                   # attention at 64x64
    return s + _bn(ch) + _conv(ch, 3, 3)


def tiny_d() -> list[tuple]:
    return _conv(3, 8, 3) + _conv(8, 16, 3) + _bn(16) + _linear(16, 1)


def tiny_g() -> list[tuple]:
    return _linear(8, 64) + _bn(4) + _convt(4, 3, 3)


def target_10m() -> list[tuple]:
    """Issue 3's aw/iga target size, ~10M parameters in 16 tensors: four 512->512 3x3 conv
    weights, eight 512-vectors (biases / norm scales), a 3->64 3x3 conv with its bias and a
    8192->1 linear with its bias: 9.45M parameters."""
    return ([(512, 512, 3, 3)] * 4 + [(512,)] * 8
            + [(64, 3, 3, 3), (64,), (1, 512 * 4 * 4), (1,)])


def target_134m() -> list[tuple]:
    """Issue 4's GPU target size (100M+ elements), 134.2M parameters in 16 tensors: eight
    4096 x 4096 weights and eight 4096-vectors."""
    return [(4096, 4096)] * 8 + [(4096,)] * 8


def gan_families(smoke: bool, gpu: bool) -> list[tuple[str, list[tuple], list[tuple]]]:
    """``(label, D shapes, G shapes)`` of a size set: the tiny pair for ``smoke``, else SN-GAN,
    DCGAN, the 10M target and BigGAN-128, plus the 134M target on a ``gpu`` (the targets: the
    same list as both D and G)."""
    if smoke:
        return [("tiny", tiny_d(), tiny_g())]
    families = [("SN-GAN", sngan_d(), sngan_g()), ("DCGAN", dcgan_d(), dcgan_g()),
                ("10M/16", target_10m(), target_10m()), ("BigGAN-128", biggan_d(), biggan_g())]
    if gpu:
        families.append(("134M/16", target_134m(), target_134m()))
    return families


def numel(shapes: Sequence[tuple]) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total
