"""Stand-in for `sdrecipe verify` inside Slurm jobs in CI, which has no upstream checkout.

The machinery under test is real (sbatch, Slurm, Lmod, the generated batch
script, the activation); only the payload is this program. It accepts verify's
options and writes a report folder in verify's format (report.json,
report.html, samples/00000.png). It prints what the job's environment looks like
(the module's DTK_TEST_LOADED and ROCM_PATH, device visibility, MIOpen cache), so
tests can see the setup really happened on the node.
$STANDIN_VERIFY picks the behaviour: "ok" (default), "fail" (exit 3 after a
failed check), "sleep" (sleep until killed, 10 minutes at most, so a job orphaned by a killed
test run ends by itself: for timeout and cancel tests), "oom" (fill 300 MB, for a job
with a smaller --mem). $STANDIN_VERIFY_DELAY: seconds to take first (a verify that
another job waits for).
"""

import argparse
import json
import os
import sys
import time


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe")
    parser.add_argument("--deploy-dir")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify")
    verify.add_argument("--profile")
    verify.add_argument("--smoke", action="store_true")
    verify.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    for name in ("DTK_TEST_LOADED", "ROCM_PATH", "SDRECIPE_PROFILE", "HIP_VISIBLE_DEVICES",
                 "CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "MIOPEN_USER_DB_PATH"):
        print("standin: %s=%s" % (name, os.environ.get(name, "")), flush=True)
    print("standin: cwd=%s" % os.getcwd(), flush=True)
    mode = os.environ.get("STANDIN_VERIFY", "ok")
    time.sleep(float(os.environ.get("STANDIN_VERIFY_DELAY", "0")))
    if mode == "oom":
        print("standin: filling memory", flush=True)
        ballast = b"x" * (300 * 2 ** 20)  # touched, so resident
        time.sleep(10)
        del ballast
    if mode == "sleep":
        print("standin: sleeping", flush=True)
        time.sleep(600)
    os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    sample = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standin_txt2img.py")
    namespace = {}
    exec(compile(open(sample).read(), sample, "exec"), namespace)
    namespace["_png"](os.path.join(args.out, "samples", "00000.png"), 64, 64, b"\x10\x80\xf0")
    ok = mode == "ok"
    checks = [{"name": "exit_code", "ok": True, "message": "txt2img.py exited 0"},
              {"name": "images", "ok": ok, "message": "1 image of 64x64" if ok
               else "stand-in failure: the image is blank"}]
    report = {"ok": ok, "profile": args.profile, "prompt": "a stand-in prompt",
              "settings": {"smoke": args.smoke}, "checks": checks, "images": ["samples/00000.png"],
              "timings": {"model_load_s": 0.1, "sampling_s": 0.2}, "provenance": {"standin": True}}
    with open(os.path.join(args.out, "report.json"), "w") as handle:
        json.dump(report, handle)
    with open(os.path.join(args.out, "report.html"), "w") as handle:
        handle.write("<html><body>stand-in report</body></html>\n")
    if not ok:
        print("standin: check images failed", file=sys.stderr, flush=True)
        return 3
    print("standin: verify ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
