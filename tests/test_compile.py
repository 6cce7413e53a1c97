"""torch.compile-first inference (ipa_export.model.compiling): no graph breaks, the documented
number of compiled graphs across batch sizes, lengths and masks, compiled/eager parity,
and the compile cache round trip. CPU, tiny config; Inductor compiles into a fresh cache."""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from ipa_export import EncoderConfig, IPAEncoder
from ipa_export.export import compile_cache
from ipa_export.export.compile_cache import compile_cache_file, load_compile_cache, save_compile_cache
from ipa_export.model.compiling import COMPILE_BOUND, CompiledEncoder, _compile_scope, _unbacked_batch, compile_encoder

TINY = EncoderConfig(
    c_s=32, c_p=16, z_factor_rank=2, feat_dim=16, c_hidden=8, no_heads=2, no_qk_points=2, no_v_points=3, depth=1
)
LENGTHS = (16, 23, 57, 100, 128, 200, 333, 512, 777, 1024)
FIELDS = ("s", "rotations", "translations", "z_f1", "z_f2")

_fresh_cache = getattr(torch._inductor.utils, "fresh_cache", None) or torch._inductor.utils.fresh_inductor_cache


@pytest.fixture(autouse=True)
def fresh_compiler(tmp_path, monkeypatch):
    """Each test starts with no compiled code, zeroed counters, an empty Inductor cache
    directory and an empty ipa_export cache (so nothing leaks between tests or into the
    user's caches)."""
    monkeypatch.setenv(compile_cache.CACHE_ENV, str(tmp_path / "user-cache"))
    torch._dynamo.reset()
    counters.clear()
    with _fresh_cache():
        yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def encoder() -> IPAEncoder:
    torch.manual_seed(0)
    return IPAEncoder(TINY).eval().requires_grad_(False)


def make_batch(batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs with padding: protein i keeps length - 7 i residues (at least 2)."""
    g = torch.Generator().manual_seed(seed)
    node_embed = torch.randn(batch, length, TINY.c_s, generator=g)
    translations = 10 * torch.randn(batch, length, 3, generator=g)
    valid = torch.tensor([max(length - 7 * i, 2) for i in range(batch)])
    return node_embed, translations, torch.arange(length) < valid[:, None]


def random_rotations(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(batch, length, 3, 3, generator=torch.Generator().manual_seed(seed)))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]
    return q * torch.det(q)[..., None, None]  # proper rotations


def assert_parity(compiled, eager, atol: float = 1e-4) -> None:
    for name in FIELDS:
        a, b = getattr(compiled, name), getattr(eager, name)
        assert a.shape == b.shape, name
        diff = (a - b).abs().max().item()
        assert diff <= atol, f"{name}: compiled and eager differ by {diff:.2e}"


def test_fullgraph_no_graph_breaks(encoder):
    args = make_batch(2, 40)
    with torch.no_grad(), _compile_scope():
        explanation = torch._dynamo.explain(encoder)(*(_unbacked_batch(a) for a in args))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow  # Inductor builds C++: minutes on a small CPU
def test_one_graph_for_all_batch_sizes_lengths_and_masks(encoder):
    counter = CompileCounterWithBackend("inductor")
    compiled = compile_encoder(encoder, backend=counter)
    assert isinstance(compiled, CompiledEncoder) and compiled.config == TINY
    specialize_float = torch._dynamo.config.specialize_float
    with torch.no_grad():
        for i, length in enumerate(LENGTHS):
            args = make_batch(i % 4 + 1, length, seed=i)
            assert_parity(compiled(*args), encoder(*args))
        node_embed, translations, _ = make_batch(3, 64)
        g = torch.Generator().manual_seed(5)
        for mask in (
            torch.ones(3, 64, dtype=torch.bool),  # no padding
            torch.rand(3, 64, generator=g) > 0.5,  # holes anywhere
            torch.arange(64).expand(3, 64) >= torch.tensor([[0], [30], [62]]),  # left padding
        ):
            compiled(node_embed, translations, mask)
    assert counter.frame_count == COMPILE_BOUND
    assert counters["stats"]["unique_graphs"] == COMPILE_BOUND
    assert torch._dynamo.config.specialize_float == specialize_float  # scoped to the calls


@pytest.mark.slow  # Inductor builds C++: minutes on a small CPU
def test_compiled_matches_eager_with_padding(encoder):
    """Every optional input given (the graph without them is checked above)."""
    compiled = compile_encoder(encoder)
    with torch.no_grad():
        for batch, length in ((3, 97), (1, 48)):
            node_embed, translations, mask = make_batch(batch, length, seed=length)
            rotations, trans_sc = random_rotations(batch, length), translations + torch.randn(batch, length, 3)
            assert_parity(
                compiled(node_embed, translations, mask, rotations=rotations, trans_sc=trans_sc),
                encoder(node_embed, translations, mask, rotations=rotations, trans_sc=trans_sc),
            )


@pytest.mark.slow  # Inductor builds C++: minutes on a small CPU
def test_compile_cache_round_trip(encoder, tmp_path, monkeypatch):
    export = encoder.save_pretrained(tmp_path / "export")
    args = make_batch(2, 50)
    with torch.no_grad():
        first = IPAEncoder.from_pretrained(export, compile=True)(*args)
    cache = compile_cache_file(export, "cpu")
    info = save_compile_cache(cache)
    assert info is not None and cache.is_file() and cache.parent == tmp_path / "user-cache" / "compile"
    assert cache.stat().st_mode & 0o777 == 0o600 and not (export / "compile_cache").exists()
    assert {"inductor", "aot_autograd"} <= set(info.artifacts)

    # A new "process": no compiled code, empty on-disk caches; only the file can help.
    torch._dynamo.reset()
    counters.clear()
    with _fresh_cache(), torch.no_grad():
        second = IPAEncoder.from_pretrained(export, compile=True)(*args)  # loads the cache
        assert counters["aot_autograd"]["autograd_cache_hit"] == 1
        assert counters["inductor"]["fxgraph_cache_miss"] == 0
    for name in FIELDS:
        assert torch.equal(getattr(first, name), getattr(second, name)), name

    loaded = []
    monkeypatch.setattr(compile_cache, "load_compile_cache", lambda path, trusted=False: loaded.append((path, trusted)))
    IPAEncoder.from_pretrained(export, compile=True, compile_cache=False)
    IPAEncoder.from_pretrained(export, compile=True, compile_cache=tmp_path / "elsewhere.bin", trust_compile_cache=True)
    cache.unlink()
    IPAEncoder.from_pretrained(export, compile=True)  # this export's cache, only when present
    assert loaded == [(tmp_path / "elsewhere.bin", True)]


def test_invalid_inputs_raise_the_encoders_errors(encoder):
    compiled = compile_encoder(encoder, backend="eager")
    node_embed, translations, mask = make_batch(2, 20)
    with torch.no_grad():
        with pytest.raises(TypeError, match="expected a torch.bool tensor"):
            compiled(node_embed, translations, mask.float())
        with pytest.raises(ValueError, match=r"translations: expected shape \[B=2, N=20, 3\], got \[1, 20, 3\]"):
            compiled(node_embed, translations[:1], mask)
        with pytest.raises(ValueError, match=r"node_mask: expected shape \[B=2, N=20\], got \[2, 5\]"):
            compiled(node_embed, translations, mask[:, :5])
        assert_parity(compiled(node_embed, translations, mask), encoder(node_embed, translations, mask))


def test_compile_cache_errors(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="no compile cache"):
        load_compile_cache(tmp_path / "missing.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a cache")
    with caplog.at_level(logging.WARNING, logger="ipa_export.export.compile_cache"):
        assert load_compile_cache(tmp_path / "junk.bin", trusted=True) is None
    assert "not a compile cache" in caplog.text


def test_bf16_attention_is_one_node_without_graph_breaks(encoder):
    """Low-precision attention loops over blocks of queries; compiled, the loop is the custom op
    ``ipa_export::anchored_attention``, so the graph does not depend on the length."""
    bf16 = IPAEncoder(TINY.replace(attn_dtype="bf16")).eval().requires_grad_(False)
    args = make_batch(2, 40)
    with torch.no_grad(), _compile_scope():
        explanation = torch._dynamo.explain(bf16)(*(_unbacked_batch(a) for a in args))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    assert "ipa_export.anchored_attention" in str(explanation.graphs[0].graph)


@pytest.mark.slow  # Inductor builds C++: minutes on a small CPU
def test_bf16_compiled_keeps_the_compensation_and_one_graph(encoder):
    """Compiled bf16 attention is as close to fp32 as eager bf16 (Inductor may elide a
    ``.to(bf16).float()`` round trip, which would zero the compensation's low parts), with one
    graph for every length; its gradient (the custom op's recomputing backward) equals eager's."""
    bf16 = IPAEncoder(TINY.replace(attn_dtype="bf16")).eval().requires_grad_(False)
    bf16.load_state_dict(encoder.state_dict())
    counter = CompileCounterWithBackend("inductor")
    compiled = compile_encoder(bf16, backend=counter)
    with torch.no_grad():
        for i, length in enumerate((16, 57, 100, 200)):
            node_embed, translations, mask = make_batch(i % 2 + 1, length, seed=i)
            translations = translations + 500.0  # far from the origin
            fp32, eager, fast = (m(node_embed, translations, mask).s for m in (encoder, bf16, compiled))
            eager_error = (eager - fp32)[mask].abs().max().item()
            compiled_error = (fast - fp32)[mask].abs().max().item()
            assert compiled_error <= max(2 * eager_error, 1e-3), (length, compiled_error, eager_error)
    assert counter.frame_count == COMPILE_BOUND

    node_embed, translations, mask = make_batch(2, 45, seed=7)
    trained = torch.compile(bf16, fullgraph=True)
    grads = []
    for model in (bf16, trained):
        x = node_embed.clone().requires_grad_()
        (model(x, translations, mask).s[mask].square().sum()).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=2e-3, rtol=2e-2)
