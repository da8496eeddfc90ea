"""Run upstream's txt2img.py for many prompts in one process, loading the model once.

    python txt2img_batch.py MANIFEST TASK COUNT

Runs inside a Slurm array task, under the target environment's Python (3.8,
stdlib only). MANIFEST (written by `sdrecipe submit generate`) lists the prompts,
the sampling settings and the output folder; this task takes every COUNT-th
prompt starting at TASK, so the split is deterministic and needs no coordination.

Why one process per task and not one `python txt2img.py` per prompt: loading the
4 GB checkpoint (plus importing torch) takes longer than sampling one prompt on a
DCU. Why not upstream's `--from-file`: it seeds once for the whole list, so a
prompt's images would depend on its position in the list, and a resubmitted
batch would not reproduce them. So we import txt2img.py as a module, memoise its
`load_model_from_config`, and call its unchanged `main()` once per prompt with
that prompt's own `--seed`: every prompt's images are exactly what the standalone
command `python scripts/txt2img.py --prompt P --seed S ...` makes (byte for byte;
checked against the real upstream). One subtlety makes that true: `main()` seeds,
then builds the model, whose random initialisation draws from the generators
before the sampler draws its noise. So the first load records the generators'
state it leaves behind for that seed, and a cached load restores it.

Before anything imports torch, every model file the manifest pins is proven to be
its bytes (`tampered`): unchanged since `submit` proved it (size, mtime, ctime,
inode, device: any write moves ctime) or hashed here. A changed file stops the
task before anything is unpickled.

Each prompt is written to `<folder>.partial-<job>`, its images and `prompt.json`
sidecar (which lists every image with its size) flushed to disk, and the folder
renamed into place: a prompt's output appears whole or not at all. A prompt whose
folder is complete is skipped, one whose folder is not (an image missing or cut
short) is made again, and a killed task's partial folders are removed: so a task
that Slurm requeues (preemption, `scontrol requeue`, a node failure) or a batch
resubmitted after dying halfway finishes the rest and makes the same bytes.
"""

import glob
import hashlib
import importlib.util
import json
import os
import random
import shutil
import socket
import sys
import time

SIDECAR = "prompt.json"


def share(entries, task, count):
    """This task's prompts: every `count`-th one from `task` on."""
    return entries[task::count]


def is_done(folder):
    """A prompt is done when its sidecar exists and lists images that all exist, at the
    sizes it recorded (sidecars older than the sizes: existence only)."""
    try:
        with open(os.path.join(folder, SIDECAR)) as handle:
            sidecar = json.load(handle)
        images, sizes = sidecar["images"], sidecar.get("bytes", {})
        for name in images:
            size = os.path.getsize(os.path.join(folder, name))  # OSError: missing
            if sizes.get(name, size) != size:
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return bool(images)


def _fsync(path):
    """Flush a file or folder to disk: the rename that publishes a prompt must not reach
    the disk before its bytes do (a node crash would leave a complete-looking folder)."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def txt2img_args(settings, models):
    """Upstream txt2img.py's own options for our settings and model files."""
    args = ["--seed", str(settings["seed"]), "--ddim_steps", str(settings["steps"]),
            "--n_samples", str(settings["n_samples"]), "--n_iter", str(settings["n_iter"]),
            "--H", str(settings["H"]), "--W", str(settings["W"]), "--scale", str(settings["scale"]),
            "--precision", settings["precision"], "--config", models["config"],
            "--ckpt", models["ckpt"], "--skip_grid"]
    sampler = {"plms": ["--plms"], "dpm": ["--dpm_solver"], "ddim": []}[settings["sampler"]]
    return args + sampler


def _rng_state():
    """The state of every random generator the script's libraries use (those imported)."""
    state = {"random": random.getstate()}
    numpy, torch = sys.modules.get("numpy"), sys.modules.get("torch")
    if numpy is not None:
        state["numpy"] = numpy.random.get_state()
    if torch is not None:
        state["torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    random.setstate(state["random"])
    if "numpy" in state:
        sys.modules["numpy"].random.set_state(state["numpy"])
    if "torch" in state:
        sys.modules["torch"].set_rng_state(state["torch"])
    if "cuda" in state:
        sys.modules["torch"].cuda.set_rng_state_all(state["cuda"])


def _rng_key():
    """A fingerprint of the seed the generators were just set to (main() seeds all of them)."""
    digest = hashlib.sha256(repr(random.getstate()).encode())
    torch = sys.modules.get("torch")
    if torch is not None:
        digest.update(torch.get_rng_state().numpy().tobytes())
    return digest.hexdigest()


class Upstream:
    """upstream's scripts/txt2img.py as a module, with the model loaded once per process."""

    def __init__(self, source):
        script = os.path.join(source, "scripts", "txt2img.py")
        sys.path.insert(0, source)
        sys.path.insert(0, os.path.dirname(script))
        spec = importlib.util.spec_from_file_location("sdrecipe_txt2img", script)
        self.module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.module)  # imports torch, loads the safety checker
        self.script = script
        self.load_seconds = 0.0
        self._models = {}  # ckpt -> (model, {generators' state on entry: state after loading})
        load = self.module.load_model_from_config

        def load_once(config, ckpt, *args, **kwargs):
            model, after = self._models.get(ckpt, (None, {}))
            entry = _rng_key()
            if entry not in after:  # first load, or a seed not seen yet: really load
                self._models.pop(ckpt, None)
                model = None  # never two copies in device memory
                started = time.time()
                model = load(config, ckpt, *args, **kwargs)
                self.load_seconds += time.time() - started
                after = {entry: _rng_state()}
                self._models[ckpt] = (model, after)
            _set_rng_state(after[entry])
            return model

        self.module.load_model_from_config = load_once

    def run(self, prompt, outdir, settings, models):
        sys.argv = [self.script, "--prompt", prompt, "--outdir", outdir] + txt2img_args(settings,
                                                                                         models)
        self.module.main()


def run_prompt(upstream, entry, manifest, job):
    """Make one prompt's images in a partial folder, then rename it into place."""
    settings = manifest["settings"]
    folder = os.path.join(manifest["out"], entry["folder"])
    for stale in glob.glob(glob.escape(folder) + ".partial-*"):  # left by a killed job
        shutil.rmtree(stale, ignore_errors=True)
    partial = "%s.partial-%s" % (folder, job["id"])
    os.makedirs(partial)
    loaded_before = upstream.load_seconds
    started = time.time()
    try:
        upstream.run(entry["prompt"], partial, settings, manifest["models"])
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    total = time.time() - started
    samples = os.path.join(partial, "samples")
    images = []
    for name in sorted(os.listdir(samples)):
        if name.endswith(".png"):
            os.rename(os.path.join(samples, name), os.path.join(partial, name))
            images.append(name)
    shutil.rmtree(samples)
    if not images:
        raise RuntimeError("txt2img.py finished without writing an image")
    model_load = upstream.load_seconds - loaded_before
    sidecar = {"prompt": entry["prompt"], "index": entry["index"], "seed": settings["seed"],
               "settings": settings, "images": images,
               "bytes": {name: os.path.getsize(os.path.join(partial, name)) for name in images},
               "timing": {"model_load_s": round(model_load, 3),
                          "sampling_s": round(total - model_load, 3), "total_s": round(total, 3)},
               "node": socket.gethostname(), "job": job,
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with open(os.path.join(partial, SIDECAR), "w") as handle:
        json.dump(sidecar, handle, indent=2, ensure_ascii=False)
    for name in images + [SIDECAR, ""]:
        _fsync(os.path.join(partial, name))
    if os.path.isdir(folder):  # incomplete (else it was skipped): replace it
        shutil.rmtree(folder)
    os.rename(partial, folder)
    _fsync(manifest["out"])
    return sidecar


STAMP_FIELDS = ("size", "mtime_ns", "ctime_ns", "ino", "dev")


def _stat_fields(path):
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "ino": st.st_ino, "dev": st.st_dev}


def tampered(pinned):
    """The first pinned file whose bytes are not its sha256, as (path, expected, found);
    None when all are. A file whose stat still equals the one proven at submission is
    trusted; any other is hashed (stdlib only: this runs under the env's Python 3.8)."""
    for entry in pinned:
        path = entry["path"]
        try:
            if _stat_fields(path) == {k: entry["stat"].get(k) for k in STAMP_FIELDS}:
                continue
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(8 << 20), b""):
                    digest.update(chunk)
            found = digest.hexdigest()
        except OSError as exc:
            found = "unreadable (%s)" % exc
        if found != entry["sha256"]:
            return path, entry["sha256"], found
    return None


def main(argv):
    manifest_path, task, count = argv[0], int(argv[1]), int(argv[2])
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    job = {"id": os.environ.get("SLURM_JOB_ID", str(os.getpid())),
           "array_job": os.environ.get("SLURM_ARRAY_JOB_ID"), "array_task": task}
    mine = share(manifest["prompts"], task, count)
    todo = [e for e in mine if not is_done(os.path.join(manifest["out"], e["folder"]))]
    print("sdrecipe: task %d of %d: %d prompts, %d already done" % (task, count, len(mine),
                                                                   len(mine) - len(todo)), flush=True)
    if not todo:
        return 0
    bad = tampered(manifest.get("pinned", []))
    if bad:
        print("sdrecipe: error: %s: expected sha256 %s, found %s: changed since it was placed; "
              "nothing loaded it. Run `sdrecipe fetch --verify` to repair it" % bad,
              file=sys.stderr, flush=True)
        return 2
    upstream = Upstream(manifest["source"])
    failed = []
    for entry in todo:
        print("sdrecipe: prompt %d: %s" % (entry["index"], entry["prompt"]), flush=True)
        try:
            sidecar = run_prompt(upstream, entry, manifest, job)
        except Exception as exc:  # keep going: the other prompts are worth having
            print("sdrecipe: prompt %d failed: %s: %s" % (entry["index"], type(exc).__name__, exc),
                  file=sys.stderr, flush=True)
            failed.append(entry["index"])
            continue
        print("sdrecipe: prompt %d done: %d images in %.1f s -> %s" % (
            entry["index"], len(sidecar["images"]), sidecar["timing"]["total_s"],
            entry["folder"]), flush=True)
    if failed:
        print("sdrecipe: %d prompts failed (%s); resubmit to retry them" % (
            len(failed), ", ".join(map(str, failed))), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
