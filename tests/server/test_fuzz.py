"""Hypothesis builds malformed Sample and Rewrite requests and sends them to a real server over a
real channel: each one comes back INVALID_ARGUMENT with ErrorInfo and a BadRequest naming a field,
and the server still answers a valid Sample afterwards.

Every generated request is a valid one (``tiny`` with seed 0; ``spec_pb()``) with at least one
defect applied, and every defect is one the API documents as invalid: zero-valued fields
(``rank``, ``steps``, ``lr`` 0) mean "the default" in proto3 and are not defects here. Model
references are only ever malformed (never a well-formed name that happens not to exist), so
NOT_FOUND is not an accepted answer.
"""

from __future__ import annotations

import math

import grpc
import pytest
from google.rpc import error_details_pb2
from hypothesis import HealthCheck, given, settings, strategies as st

from rulewright.service.server.app import create_server
from rulewright.v1 import generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc, images_pb2
from tests.builders import tiny_domain

from .conftest import BACKENDS, detail, error_info, rpc_status, s3_redis_domain
from .test_generator import spec_pb

Z_DIM = 16           # the tiny DCGAN's latent width
RESOLUTION = 32      # its image size
LAYER = "main.6"     # the layer spec_pb() edits (8 channels in, 3 out)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])


@pytest.fixture(scope="module", params=BACKENDS)
def generator(request, tmp_path_factory):
    """One server per backend for the whole module (as conftest's ``server``), so examples stay cheap."""
    tmp = tmp_path_factory.mktemp("fuzz")
    if request.param == "embedded":
        domain = tiny_domain(tmp)
    else:
        redis_server = request.getfixturevalue("redis_server")
        if redis_server.proc is None or redis_server.proc.poll() is not None:
            redis_server.start()
        domain = s3_redis_domain(tmp, request.getfixturevalue("moto_server"), redis_server.url)
    server, port = create_server(domain)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield gen_grpc.GeneratorServiceStub(channel)
    finally:
        server.stop(0).wait()
        domain.close()


def assert_invalid_argument(err: grpc.RpcError) -> None:
    """INVALID_ARGUMENT with ErrorInfo and a BadRequest whose violations all name a field."""
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    status = rpc_status(err)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    info = error_info(err)
    assert info.reason and info.domain, info
    violations = detail(err, error_details_pb2.BadRequest).field_violations
    assert violations and all(v.field and v.description for v in violations), violations


def still_serving(generator) -> None:
    r = generator.Sample(gen.SampleRequest(model="tiny", seeds=[0]), timeout=30)
    assert r.version == "models/tiny/versions/1" and len(r.images) == 1


def refused(call) -> grpc.RpcError:
    try:
        result = call()
    except grpc.RpcError as err:
        return err
    raise AssertionError(f"a malformed request succeeded: {result}")


# ---- strategies: defects of a SampleRequest ------------------------------------------------------

NAN_OR_INF = st.sampled_from([math.nan, math.inf, -math.inf])
BAD_REFERENCE = st.one_of(
    st.just(""),
    st.builds(lambda junk, at: f"tiny{at}{junk}", st.text(alphabet=" !#$%^&*()?<>\\|\"'`~=+,;", min_size=1,
                                                          max_size=6), st.sampled_from(["", "@", "/"])),
    st.sampled_from(["Not A Ref!", "tiny/", "tiny@", "/tiny", "tiny/-1", "tiny@@production", "tiny/1/2",
                     "models/", " tiny", "tiny "]),
)


def _latents(count: int, dim: int, values: list[float]) -> gen.Latents:
    return gen.Latents(count=count, dim=dim, values=values)


WRONG_WIDTH = st.builds(lambda count, dim: _latents(count, dim, [0.0] * (count * dim)),
                        st.integers(1, 3), st.integers(1, 40).filter(lambda d: d != Z_DIM))
WRONG_LENGTH = st.builds(lambda count, extra: _latents(count, Z_DIM, [0.0] * (count * Z_DIM + extra)),
                         st.integers(1, 3), st.integers(-Z_DIM + 1, Z_DIM).filter(bool))
NON_POSITIVE_SHAPE = st.builds(lambda count, dim: _latents(count, dim, []),
                               st.integers(-3, 0), st.integers(-3, Z_DIM))
NON_FINITE = st.builds(lambda count, where, bad: _latents(count, Z_DIM, [
    bad if i == where % (count * Z_DIM) else 0.1 for i in range(count * Z_DIM)]),
    st.integers(1, 3), st.integers(0, 47), NAN_OR_INF)


@st.composite
def bad_sample(draw) -> gen.SampleRequest:
    """A valid SampleRequest with one or more documented defects."""
    req = gen.SampleRequest(model="tiny", seeds=[0])
    defects = draw(st.lists(st.sampled_from(["seed", "model", "latents", "truncation", "both", "neither",
                                             "units", "image_format"]), min_size=1, max_size=3, unique=True))
    for defect in defects:
        if defect == "seed":
            seeds = draw(st.lists(st.integers(0, 2**40), max_size=3))
            seeds.insert(draw(st.integers(0, len(seeds))), draw(st.integers(-(2**63), -1)))
            req.ClearField("seeds")
            req.seeds.extend(seeds)
        elif defect == "model":
            req.model = draw(BAD_REFERENCE)
        elif defect == "latents":
            req.ClearField("seeds")
            req.latents.CopyFrom(draw(st.one_of(WRONG_WIDTH, WRONG_LENGTH, NON_POSITIVE_SHAPE, NON_FINITE)))
        elif defect == "truncation":
            req.truncation = draw(st.one_of(NAN_OR_INF, st.floats(max_value=-1e-6, allow_nan=False),
                                            st.floats(min_value=1.000001, allow_nan=False)))
        elif defect == "both":
            if not req.seeds:
                req.seeds.append(1)
            if not req.HasField("latents"):
                req.latents.CopyFrom(_latents(1, Z_DIM, [0.0] * Z_DIM))
        elif defect == "image_format":
            req.image_format = draw(BAD_ENUM)
        elif defect == "neither":
            req.ClearField("seeds")
            req.ClearField("latents")
        elif defect == "units":
            units = draw(st.lists(st.integers(0, 7), max_size=2))
            units.append(draw(st.one_of(st.integers(-(2**31), -1), st.integers(8, 2**31 - 1))))
            req.interventions.append(gen.UnitIntervention(
                layer=LAYER, units=units, mode=draw(st.sampled_from([gen.UnitIntervention.MODE_ZERO,
                                                                     gen.UnitIntervention.MODE_SET])),
                value=draw(st.floats(-2, 2))))
    return req


# ---- strategies: defects of a RewriteRequest -----------------------------------------------------

BAD_ENUM = st.integers(3, 2**31 - 1) | st.integers(-(2**31), -1)
# Choices the spec does not know (op, goal and solver are strings, as its JSON form spells them).
BAD_CHOICE = st.sampled_from(["OP_ERASE", "GOAL_VALUE", "pixels", "Adam", "rewrite ", "3", "\u00e9"])


def _box(region: images_pb2.Region, draw) -> None:
    """An out-of-range or inverted box."""
    kind = draw(st.sampled_from(["out", "inverted", "empty"]))
    coord = st.integers(0, RESOLUTION)
    x0, y0 = draw(st.integers(0, RESOLUTION - 1)), draw(st.integers(0, RESOLUTION - 1))
    if kind == "out":
        x1, y1 = draw(coord), draw(coord)
        which = draw(st.sampled_from(["x0", "y0", "x1", "y1"]))
        bad = draw(st.one_of(st.integers(-(2**31), -1), st.integers(RESOLUTION + 1, 2**31 - 1)))
        box = dict(x0=x0, y0=y0, x1=max(x1, x0 + 1), y1=max(y1, y0 + 1))
        box[which] = bad
    elif kind == "inverted":
        box = dict(x0=x0 + 1, y0=y0, x1=draw(st.integers(0, x0)), y1=RESOLUTION)
        if draw(st.booleans()):
            box = dict(x0=x0, y0=y0 + 1, x1=RESOLUTION, y1=draw(st.integers(0, y0)))
    else:
        box = dict(x0=x0, y0=y0, x1=x0, y1=draw(st.integers(y0, RESOLUTION)))
    region.ClearField("mask")
    del region.box[:]
    region.box.extend(box[k] for k in ("x0", "y0", "x1", "y1"))


def _mask(region: images_pb2.Region, draw) -> None:
    """A mask whose bytes disagree with its size, an empty one, or one of an unknown encoding."""
    kind = draw(st.sampled_from(["short", "zero_size", "empty_png", "garbage_png", "encoding", "all_zero"]))
    w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    if kind == "short":
        n = draw(st.integers(0, 2 * w * h).filter(lambda n: n != w * h))
        m = images_pb2.Mask(encoding=images_pb2.Mask.ENCODING_RAW, width=w, height=h, data=b"\xff" * n)
    elif kind == "zero_size":
        m = images_pb2.Mask(encoding=images_pb2.Mask.ENCODING_RAW, width=0, height=draw(st.integers(-5, 5)))
    elif kind == "empty_png":
        m = images_pb2.Mask(encoding=images_pb2.Mask.ENCODING_PNG, width=w, height=h)
    elif kind == "garbage_png":
        m = images_pb2.Mask(encoding=images_pb2.Mask.ENCODING_PNG, width=w, height=h,
                            data=draw(st.binary(min_size=1, max_size=64)))
    elif kind == "encoding":
        m = images_pb2.Mask(encoding=draw(st.sampled_from([0, 4, 99, -1])), width=w, height=h, data=b"\xff" * w * h)
    else:   # the right size for the image, but it selects nothing
        m = images_pb2.Mask(encoding=images_pb2.Mask.ENCODING_RAW, width=RESOLUTION, height=RESOLUTION,
                            data=bytes(RESOLUTION * RESOLUTION))
    del region.box[:]
    region.mask.CopyFrom(m)


@st.composite
def bad_rewrite(draw) -> gen.RewriteRequest:
    """A valid RewriteRequest (a dry run) with one or more documented defects."""
    spec = spec_pb()
    req = gen.RewriteRequest(model="tiny", spec=spec, dry_run=True)
    defects = draw(st.lists(st.sampled_from(["op", "goal", "solver", "rank", "steps", "lr", "box", "mask",
                                             "no_copy", "no_paste", "model", "truncation", "ridge", "preview_seeds",
                                             "preview_format"]),
                            min_size=1, max_size=3, unique=True))
    s = req.spec
    for defect in defects:
        if defect in ("op", "goal", "solver"):
            setattr(s, defect, draw(BAD_CHOICE))
        elif defect == "rank":
            s.rank = draw(st.one_of(st.integers(-(2**31), -1), st.integers(9, 2**31 - 1)))
        elif defect == "steps":
            s.steps = draw(st.one_of(st.integers(-(2**31), -1), st.integers(100_001, 2**31 - 1)))
        elif defect == "lr":
            s.lr = draw(st.one_of(NAN_OR_INF, st.floats(max_value=-1e-12, allow_nan=False),
                                  st.floats(min_value=10.001, allow_nan=False)))
        elif defect in ("box", "mask"):
            region = s.copy if draw(st.booleans()) else (s.paste[0] if s.paste else s.paste.add(seed=2))
            (_box if defect == "box" else _mask)(region, draw)
        elif defect == "no_copy":
            s.ClearField("copy")
        elif defect == "no_paste":
            s.ClearField("paste")
        elif defect == "model":
            req.model = draw(BAD_REFERENCE)
        elif defect == "truncation":
            s.truncation = draw(st.one_of(NAN_OR_INF, st.floats(max_value=-1e-6, allow_nan=False),
                                          st.floats(min_value=1.000001, allow_nan=False)))
        elif defect == "preview_seeds":
            req.preview_seeds.extend(draw(st.lists(st.integers(0, 2**40), max_size=2)))
            req.preview_seeds.append(draw(st.integers(-(2**63), -1)))
        elif defect == "preview_format":
            req.preview_format = draw(BAD_ENUM)
        elif defect == "ridge":
            s.ridge = draw(st.one_of(NAN_OR_INF, st.floats(max_value=-1e-12, allow_nan=False)))
    return req


# ---- properties ----------------------------------------------------------------------------------

@FUZZ
@given(request=bad_sample())
def test_malformed_sample_is_invalid_argument_and_the_server_keeps_serving(generator, request):
    assert_invalid_argument(refused(lambda: generator.Sample(request, timeout=30)))
    still_serving(generator)


@FUZZ
@given(request=bad_rewrite())
def test_malformed_rewrite_is_invalid_argument_and_the_server_keeps_serving(generator, request):
    assert_invalid_argument(refused(lambda: list(generator.Rewrite(request, timeout=60))))
    still_serving(generator)
