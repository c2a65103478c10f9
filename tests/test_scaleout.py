"""Scale-out: sharded == 1 device, two processes == one, kill -9 then resume, load anywhere.

1. Three flow steps on a (data=4, fsdp=2) mesh of 8 fake devices give the losses, per-leaf
   gradients and parameters of the same steps on 1 device, and the state keeps its shardings.
2. Two local processes (jax.distributed, gloo, 2 fake devices each) train the VAE stage: each
   reads its own part of every global batch, and both end with the parameters of a 1-process
   4-device run on the same global batches.
3. `kill -9` during training, then the same command: it restores step k and runs the N - k steps
   left, ending bit-exactly where an uninterrupted run ends.
4. A checkpoint written on the (4, 2) mesh loads through `load_run` in a 1-device process.
"""

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import TINY
from jax.sharding import NamedSharding, PartitionSpec

from microforge_jax import checkpoint, optim, sharding, train_steps
from microforge_jax.config import ModelConfig, load_config
from microforge_jax.models.denoiser import Text, build_denoiser
from microforge_jax.models.vae import build_vae

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_multiprocess_worker.py"
TOL = 1e-5
BATCH = 8
STEPS = 3


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _treewise(a: dict, b: dict, relerr) -> float:
    """Normwise error of the whole tree (all leaves concatenated)."""
    keys = sorted(b)
    return relerr(np.concatenate([a[k].ravel() for k in keys]), np.concatenate([b[k].ravel() for k in keys]))


# ----------------------------------------------------------------------------- subprocesses


def _env(devices: int, cache: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    if cache:  # the persistent compilation cache; not for multi-process runs (see the two-process test)
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5"
        )
    return env


def _start(cmd: list[str], devices: int, log: Path, cache: bool = True) -> subprocess.Popen:
    """A child in its own process group (so the whole group can be killed), output to `log`."""
    with open(log, "w") as f:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=_env(devices, cache), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def _wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float, expect: int = 0) -> None:
    """Waits for every process (one deadline) to exit with `expect`; on a timeout or a failure kills every group."""
    deadline = time.monotonic() + timeout
    try:
        for proc, log in zip(procs, logs, strict=True):
            rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
            assert rc == expect, f"{' '.join(proc.args[:3])} exited with {rc}:\n{log.read_text()[-3000:]}"
    except subprocess.TimeoutExpired:
        pytest.fail(f"timed out after {timeout}s:\n" + "\n".join(log.read_text()[-1500:] for log in logs))
    finally:
        for proc in procs:
            _kill(proc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- 1. sharded == 1 device


def _flow_config():
    steps = [f"train.flow.{k}={v}" for k, v in (("steps", STEPS), ("batch_size", BATCH), ("warmup_steps", 1))]
    # patch_size=1: 8x8 tokens. With nano's 2x2 patches (4x4 tokens) every leaf but one stays within TOL; the
    # planner's carry_gate gradient drifts to 4.8e-5 at step 3 (a sum with heavy cancellation, after two Adam
    # steps have amplified rounding differences of the parameters). Sharding does not depend on the patch size.
    return load_config("nano", TINY + tuple(steps) + ("model.backbone.patch_size=1",))


def _random_batches(cfg: ModelConfig, image_size: int, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    m, e = cfg.text.max_length, cfg.text.embed_dim
    out = []
    for _ in range(n):
        lengths = rng.integers(3, m + 1, BATCH)
        out.append(
            {
                "image": rng.uniform(-1, 1, (BATCH, image_size, image_size, 3)).astype(np.float32),
                "text_tokens": rng.standard_normal((BATCH, m, e)).astype(np.float32),
                "text_mask": np.arange(m)[None, :] < lengths[:, None],
                "text_pooled": rng.standard_normal((BATCH, e)).astype(np.float32),
            }
        )
    return out


@pytest.fixture(scope="module")
def flow_runs(redraw):
    """Three flow steps on the (4, 2) mesh and on 1 device, from the same redrawn state and batches."""
    config = _flow_config()
    cfg, hp = ModelConfig.from_config(config), config.train.flow
    rules = sharding.rules_from_config(config.sharding)
    denoiser, vae, tx = build_denoiser(cfg), build_vae(cfg), optim.make_optimizer(hp)
    side = config.image_size // cfg.vae.downsample_factor
    m, e = cfg.text.max_length, cfg.text.embed_dim
    z = jnp.zeros((BATCH, side, side, cfg.latent_channels))
    t = jnp.zeros((BATCH,))
    text = Text(jnp.zeros((BATCH, m, e)), jnp.ones((BATCH, m), bool), jnp.zeros((BATCH, e)))

    def init_fn():  # as run_flow_stage builds it
        params = {"denoiser": denoiser.init(jax.random.key(config.seed + 1), z, t, text)}
        return {"step": jnp.zeros((), jnp.int32), "params": params, "ema_params": params, "opt_state": tx.init(params)}

    abstract = jax.eval_shape(init_fn)
    params = redraw(jax.jit(lambda: nn.unbox(init_fn()["params"]))(), seed=1)
    host_state = jax.device_get(
        {"step": jnp.zeros((), jnp.int32), "params": params, "ema_params": params, "opt_state": tx.init(params)}
    )
    image = jnp.zeros((1, config.image_size, config.image_size, 3))
    vae_params = jax.device_get(redraw(jax.jit(lambda: nn.unbox(vae.init(jax.random.key(2), image)))(), seed=2))
    r = np.random.default_rng(3)
    empty = Text(
        r.standard_normal((1, m, e)).astype(np.float32),
        np.arange(m)[None] < 5,
        r.standard_normal((1, e)).astype(np.float32),
    )
    frozen = {"vae": vae_params, "empty_text": empty}
    spec = train_steps.FlowStep(denoiser, vae, tx, hp, latent_scale=0.9, latent_shift=0.05)
    batches = _random_batches(cfg, config.image_size, STEPS)

    def step_with_grads(state, batch, rng, frozen):
        """flow_train_step unchanged, plus the gradients it hands to its optimizer."""
        seen = {}

        def update(grads, opt_state, params=None):
            seen["grads"] = grads
            return tx.update(grads, opt_state, params)

        capturing = optax.GradientTransformation(tx.init, update)
        state, metrics = train_steps.flow_train_step(dataclasses.replace(spec, tx=capturing), state, batch, rng, frozen)
        return state, metrics, seen["grads"]

    def run(mesh):
        shardings = sharding.logical_to_shardings(abstract, mesh, rules)
        replicated = NamedSharding(mesh, PartitionSpec())
        assert jax.tree.structure(shardings) == jax.tree.structure(host_state)
        state = jax.device_put(host_state, shardings)
        frozen_shardings = jax.tree.map(lambda _: replicated, frozen)
        frozen_on = jax.device_put(frozen, frozen_shardings)
        rng = jax.device_put(jax.random.key(5), replicated)
        step = None
        out = {"loss": [], "grads": [], "params": [], "shardings": shardings}
        with sharding.use_mesh(mesh, rules):
            for batch in batches:
                batch = sharding.shard_batch(batch, mesh, rules)
                if step is None:  # as train_lib, but no out_shardings: keeping the layout is the step's doing
                    step = jax.jit(
                        step_with_grads,
                        in_shardings=(
                            shardings,
                            jax.tree.map(lambda x: x.sharding, batch),
                            replicated,
                            frozen_shardings,
                        ),
                        donate_argnums=(0,),
                    )
                before = jax.tree.map(lambda x: x.sharding, state)
                state, metrics, grads = step(state, batch, rng, frozen_on)
                after = jax.tree.map(lambda x: x.sharding, state)
                changed = [
                    f"{jax.tree_util.keystr(p)}: {a.spec} -> {b.spec}"
                    for (p, a), b, x in zip(
                        jax.tree_util.tree_flatten_with_path(before)[0],
                        jax.tree.leaves(after),
                        jax.tree.leaves(state),
                        strict=True,
                    )
                    if not a.is_equivalent_to(b, x.ndim)
                ]
                assert not changed, f"the step changed shardings: {changed[:5]}"
                out["loss"].append(float(metrics["train/loss"]))
                out["grads"].append(_flat(jax.device_get(grads)))
                out["params"].append(_flat(jax.device_get(state["params"])))
        out["state"] = state
        return out

    sharded = run(sharding.make_mesh(("data", "fsdp", "tensor"), (4, 2, 1)))
    single = run(sharding.make_mesh(("data", "fsdp", "tensor"), (1, 1, 1), devices=jax.devices()[:1]))
    return {
        "config": config,
        "sharded": sharded,
        "single": single,
        "vae_params": vae_params,
        "vae": vae,
        "initial_params": _flat(host_state["params"]),
    }


def test_sharded_flow_steps_match_one_device(flow_runs, relerr):
    sharded, single = flow_runs["sharded"], flow_runs["single"]
    # The (4, 2) mesh really shards parameters over fsdp (else the comparison is data-parallel only).
    specs = [s.spec for s in jax.tree.leaves(sharded["shardings"]["params"])]
    assert sum("fsdp" in spec for spec in specs) >= len(specs) // 4
    np.testing.assert_allclose(sharded["loss"], single["loss"], rtol=TOL)
    assert len(set(single["loss"])) == STEPS  # three different batches
    worst = {"grads": 0.0, "params": 0.0}
    structural = set()  # leaves whose gradient is zero in exact arithmetic (e.g. a key bias under softmax)
    for i in range(STEPS):
        total = np.linalg.norm(np.concatenate([g.ravel() for g in single["grads"][i].values()]))
        for k, g in single["grads"][i].items():
            assert np.linalg.norm(g) > 0, f"zero gradient for {k}"
            if np.linalg.norm(g) < 1e-6 * total:
                structural.add(k)
        for kind in ("grads", "params"):
            a, b = sharded[kind][i], single[kind][i]
            assert a.keys() == b.keys()
            for k in b:
                err = relerr(a[k], b[k])
                if k in structural:  # gradient: rounding noise on both sides, small against the whole;
                    if kind == "grads":  # parameters: Adam's updates of that noise (whole-tree check below)
                        assert np.linalg.norm(a[k] - b[k]) <= TOL * total, k
                    continue
                worst[kind] = max(worst[kind], err)
                assert err <= TOL, f"step {i + 1} {kind} {k}: normwise {err:.2e}"
        tree_err = _treewise(sharded["params"][i], single["params"][i], relerr)
        assert tree_err <= TOL
    loss_err = relerr(sharded["loss"], single["loss"])
    print(f"\nsharded vs 1 device, worst per-leaf normwise: grads {worst['grads']:.2e}, params {worst['params']:.2e}")
    print(f"whole-tree params normwise after step {STEPS}: {tree_err:.2e}; losses {loss_err:.2e}")
    print(f"structurally zero gradients: {sorted(structural)}")
    # The parameters moved (a non-vacuous parameter comparison); the state kept its (4, 2) layout.
    initial = flow_runs["initial_params"]
    assert max(relerr(single["params"][-1][k], initial[k]) for k in initial) > 1e-4
    for leaf, want in zip(jax.tree.leaves(sharded["state"]), jax.tree.leaves(sharded["shardings"]), strict=True):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)


# ----------------------------------------------------------------------------- 2. two processes == one


def _vae_overrides(steps: int) -> list[str]:
    return [*TINY, "stages=('vae',)", f"train.vae.steps={steps}", f"train.vae.batch_size={BATCH}"]


@pytest.mark.slow
def test_two_processes_train_like_one_process(tmp_path, relerr):
    """2 processes x 2 fake devices (gloo) == 1 process x 4 devices, on the same global batches."""
    overrides = [*_vae_overrides(STEPS), "sharding.mesh_shape=(4,1,1)"]
    multi, ref = tmp_path / "multi", tmp_path / "ref"
    multi.mkdir(), ref.mkdir()

    def cmd(out: Path, *extra: str) -> list[str]:
        return [sys.executable, str(WORKER), "--out", str(out), "--workdir", str(out / "run"), *extra, *overrides]

    coordinator = ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2"]
    logs = [multi / "log0", multi / "log1", ref / "log"]
    # No persistent compilation cache here: with executables loaded from it, the gloo processes of
    # jax 0.10.2 on CPU hang in their first collective (seen on this machine).
    procs = [_start(cmd(multi, *coordinator, "--process-id", str(i)), 2, logs[i], cache=False) for i in range(2)]
    # The reference: one process, 4 devices, every global batch in the row order of the 2-process run.
    procs.append(_start(cmd(ref, "--interleave", "2"), 4, logs[2]))
    _wait_all(procs, logs, timeout=420)

    # Each process read its own half of every global batch; together, the reference's batches.
    read = [json.loads((multi / f"batches_{i}.json").read_text()) for i in range(2)]
    want = json.loads((ref / "batches_0.json").read_text())
    assert len(read[0]) == len(read[1]) == len(want) == STEPS
    for step in range(STEPS):
        a, b = read[0][step], read[1][step]
        assert len(a) == len(b) == BATCH // 2 and not set(a) & set(b), f"step {step + 1}: overlapping reads"
        assert a + b == want[step] and len(set(want[step])) == BATCH
    # The checkpoint was written by both processes (one iterator state each); config.json by process 0.
    assert checkpoint.latest_steps(multi / "run") == {"vae": STEPS}
    data_dir = multi / "run" / "checkpoints" / "vae" / str(STEPS) / "data"
    assert sorted(p.name for p in data_dir.glob("process_*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
    # Both processes measured the same latent scale/shift (pooled over both processes' data).
    scales = [[line for line in log.read_text().splitlines() if "latent scale" in line] for log in logs]
    assert scales[0] == scales[1] == scales[2] and len(scales[0]) == 1, scales

    p0, p1, r = (np.load(path) for path in (multi / "params_0.npz", multi / "params_1.npz", ref / "params_0.npz"))
    assert sorted(p0.files) == sorted(p1.files) == sorted(r.files)
    assert all(np.array_equal(p0[k], p1[k]) for k in p0.files)  # both processes hold the same model
    losses = [[json.loads(line)["train/loss"] for line in (d / "run" / "metrics.jsonl").read_text().splitlines()]
              for d in (multi, ref)]  # fmt: skip
    assert len(losses[0]) == STEPS and relerr(losses[0], losses[1]) <= TOL
    # Zero-initialised conv biases inside the VAE's residual blocks sit in front of a GroupNorm:
    # their gradient is zero up to rounding, which Adam turns into updates of pure noise. They are
    # left out; every other leaf is compared.
    noise = re.compile(r"block\d+'\]\['conv[12]'\]\['bias'\]")
    keys = [k for k in r.files if not noise.search(k)]
    assert len(keys) >= 0.8 * len(r.files)
    for prefix in ("['params']", "['ema_params']"):
        part = [k for k in keys if k.startswith(prefix)]
        err = _treewise({k: p0[k] for k in part}, {k: r[k] for k in part}, relerr)
        print(f"\n2 processes vs 1 process: losses {relerr(losses[0], losses[1]):.2e}, {prefix} normwise {err:.2e}")
        assert err <= TOL
    worst = max(relerr(p0[k], r[k]) for k in keys)
    print(f"worst per-leaf normwise: {worst:.2e} ({len(r.files) - len(keys)} noise leaves left out)")
    assert worst <= 10 * TOL  # elementwise, Adam amplifies rounding in tiny gradients: per leaf is noisier


# ----------------------------------------------------------------------------- 2b. SIGTERM to one of two processes


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    """A preemption notice that reaches one host only: both processes stop and save the same step.

    Process 1 signals itself during step 3; with stop_check_every=2 the processes agree at step 4,
    save it together (no periodic checkpoints in between) and exit 143; the rerun resumes at 4.
    """
    n = 6
    overrides = [*_vae_overrides(n), "sharding.mesh_shape=(4,1,1)", "checkpoint_every=100", "stop_check_every=2"]
    # Shorter compiles (each run compiles afresh): no residual blocks, no GAN, no latent-scale pass.
    overrides += ["model.vae.encoder_blocks=0", "model.vae.decoder_blocks=0", "train.vae.gan_weight=0"]
    overrides += ["model.vae.scaling_factor=0.5"]
    workdir = tmp_path / "run"

    def start(tag: str, *extra: str) -> tuple[list[subprocess.Popen], list[Path]]:
        port = _free_port()
        procs, logs = [], []
        for i in range(2):
            out = tmp_path / f"{tag}{i}"
            out.mkdir()
            cmd = [sys.executable, str(WORKER), "--out", str(out), "--workdir", str(workdir)]
            cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), *extra]
            logs.append(tmp_path / f"{tag}{i}.log")
            procs.append(_start([*cmd, *overrides], 2, logs[-1], cache=False))  # no cache: see the test above
        return procs, logs

    procs, logs = start("stop", "--sigterm-at", "3", "--sigterm-process", "1")
    _wait_all(procs, logs, timeout=240, expect=128 + signal.SIGTERM)
    texts = [log.read_text() for log in logs]
    assert "worker 1: SIGTERM to myself at step 3" in texts[1] and "SIGTERM to myself" not in texts[0]
    for text in texts:
        assert "[vae] SIGTERM: saving step 4 and stopping" in text, text[-2000:]
        assert "Traceback" not in text
    assert checkpoint.latest_steps(workdir) == {"vae": 4}
    data_dir = workdir / "checkpoints" / "vae" / "4" / "data"
    assert sorted(p.name for p in data_dir.glob("process_*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]

    procs, logs = start("resume")
    _wait_all(procs, logs, timeout=240)
    for log in logs:
        assert f"[vae] restored step 4, {n - 4} steps to go" in log.read_text()
    assert checkpoint.latest_steps(workdir) == {"vae": n}
    assert _metrics_steps(workdir) == [1, 2, 3, 4, 5, 6]  # process 0's log: the steps before and after


# ----------------------------------------------------------------------------- 3. kill -9, resume


def _metrics_steps(workdir: Path, skip: int = 0) -> list[int]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()[skip:]
    return [json.loads(line)["step"] for line in lines if json.loads(line)["stage"] == "vae"]


def test_kill_9_then_resume_ends_bit_exactly_like_an_uninterrupted_run(tmp_path):
    n = 6  # TINY checkpoints every 2 steps
    command = lambda workdir: [sys.executable, "train.py", "--workdir", str(workdir), *_vae_overrides(n)]
    straight, run = tmp_path / "straight", tmp_path / "run"
    logs = [tmp_path / "straight.log", tmp_path / "killed.log", tmp_path / "resumed.log"]
    _wait_all([_start(command(straight), 1, logs[0])], logs[:1], timeout=300)

    proc = _start(command(run), 1, logs[1])
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if (run / checkpoint.CHECKPOINT_DIR).is_dir() and checkpoint.latest_steps(run).get("vae") in (2, 4):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        rc = proc.wait(timeout=60)
    finally:
        _kill(proc)
    assert rc == -signal.SIGKILL, f"the run was not killed mid-way (exit {rc}):\n{logs[1].read_text()[-2000:]}"
    k = checkpoint.latest_steps(run)["vae"]
    assert 0 < k < n
    logged = len((run / "metrics.jsonl").read_text().splitlines())

    _wait_all([_start(command(run), 1, logs[2])], logs[2:], timeout=300)
    assert f"[vae] restored step {k}, {n - k} steps to go" in logs[2].read_text()
    assert _metrics_steps(run, skip=logged) == list(range(k + 1, n + 1))  # only the remaining steps ran
    print(f"\nkilled with checkpoint {k} of {n} written; the rerun ran steps {k + 1}..{n}")
    a = _flat(checkpoint.restore_stage_params(straight, "vae"))
    b = _flat(checkpoint.restore_stage_params(run, "vae"))
    assert a.keys() == b.keys()
    unequal = [key for key in a if not np.array_equal(a[key], b[key])]
    assert not unequal, f"{len(unequal)} leaves differ, e.g. {unequal[:3]}"


# ----------------------------------------------------------------------------- 4. load anywhere

_LOAD = """
import sys
import jax
import numpy as np
from microforge_jax import checkpoint
assert jax.device_count() == 1, jax.devices()
config, params = checkpoint.load_run(sys.argv[1])
leaves = jax.tree_util.tree_flatten_with_path(params)[0]
assert all(len(x.devices()) == 1 for _, x in leaves)
np.savez(sys.argv[2], **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})
print("loaded", len(leaves), "leaves on", jax.devices())
"""


def test_checkpoint_written_on_the_4x2_mesh_loads_on_one_device(flow_runs, tmp_path):
    config, vae = flow_runs["config"], flow_runs["vae"]
    mesh = sharding.make_mesh(("data", "fsdp", "tensor"), (4, 2, 1))
    rules = sharding.rules_from_config(config.sharding)
    image = jnp.zeros((1, config.image_size, config.image_size, 3))
    vae_shardings = sharding.logical_to_shardings(
        jax.eval_shape(lambda: vae.init(jax.random.key(2), image)), mesh, rules
    )
    vae_on_mesh = jax.device_put(flow_runs["vae_params"], vae_shardings)
    flow_state = flow_runs["sharded"]["state"]  # after three steps on the (4, 2) mesh
    for tree in (vae_on_mesh, flow_state["ema_params"]):  # really sharded over fsdp, not replicated
        assert sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(tree)) >= 4
    checkpoint.save_run_config(tmp_path, config)
    step = jnp.asarray(1, jnp.int32)
    with checkpoint.StageCheckpointer(tmp_path, "vae") as ckpt:
        ckpt.save(1, {"step": step, "params": vae_on_mesh, "ema_params": vae_on_mesh}, force=True)
    with checkpoint.StageCheckpointer(tmp_path, "flow") as ckpt:
        ckpt.save(STEPS, flow_state, force=True)

    out, log = tmp_path / "loaded.npz", tmp_path / "load.log"
    _wait_all([_start([sys.executable, "-c", _LOAD, str(tmp_path), str(out)], 1, log)], [log], timeout=180)
    loaded = np.load(out)
    want = _flat({"vae": flow_runs["vae_params"], "denoiser": jax.device_get(flow_state["ema_params"]["denoiser"])})
    assert sorted(loaded.files) == sorted(want)
    assert all(np.array_equal(loaded[k], want[k]) for k in want)
