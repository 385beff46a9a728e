"""An emulated phone: one OS process running ``device_runtime``'s phone loop on its own phone
folder (bundle, shard, credential), shaped by its device profile.

- compute: after each local round the process sleeps (factor − 1) × the measured time, so a
  round takes ``factor`` × what this host took (factor = host speed / phone speed);
- memory: RLIMIT_AS caps the address space (the phone's budget plus the runtime's own
  mappings, see ``address_space_mb``): a phone that needs more fails with MemoryError;
- link: ``android_harness.link.ShapedTransport`` (bandwidth, RTT, loss), unless the process
  runs inside a network namespace whose tc qdiscs shape it (then only what tc cannot do);
- availability: offline windows from a trace, waited out before each task pull.

``python -m android_harness.phone SPEC.json`` runs one; ``toolkit.simulation`` starts many.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from android_harness.availability import wait_while_offline
from android_harness.link import LinkShape, LinkWindow, ShapedTransport
from device_runtime.errors import FedkitError, InternalError
from device_runtime.phone_loop import Hooks, PhoneLoop

# Address space the runtime maps before it holds any data (Python, numpy, ONNX Runtime, thread
# stacks); measured on this host at about 1.1 GB of VSZ, rounded up. RLIMIT_AS bounds virtual
# memory, so the phone's budget is added on top of it.
RUNTIME_ADDRESS_SPACE_MB = 1536


@dataclass(frozen=True)
class PhoneSpec:
    phone_dir: str
    device_id: str
    phone_class: str = "host"
    compute_factor: float = 1.0  # phone round time / host round time
    memory_mb: float | None = None  # the phone's memory budget; None: no cap
    link: LinkShape = LinkShape()
    offline: tuple[tuple[float, float], ...] = ()  # seconds from t0
    t0: float = 0.0  # the run's start, unix seconds
    duplicate_posts: bool = False
    max_wait_s: float = 1.0  # polls for the next round at least this often: emulated rounds are short

    def address_space_mb(self) -> int | None:
        return None if self.memory_mb is None else int(RUNTIME_ADDRESS_SPACE_MB + self.memory_mb)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> PhoneSpec:
        data = json.loads(Path(path).read_text())
        link = dict(data.pop("link"))
        link["windows"] = tuple(LinkWindow(**w) for w in link.get("windows", ()))
        data["offline"] = tuple(tuple(w) for w in data.get("offline", ()))
        return cls(**data, link=LinkShape(**link))


def limit_memory(megabytes: int | None) -> None:
    if megabytes is not None:
        limit = megabytes * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run(spec: PhoneSpec) -> int:
    limit_memory(spec.address_space_mb())
    loop: PhoneLoop | None = None

    def log_offline(start: float, end: float) -> None:
        if loop is None:  # the hooks run inside loop.run()
            raise InternalError("the phone went offline before its loop was made")
        loop.log.write("offline", start=round(start, 3), end=round(end, 3))

    def before_task() -> None:
        wait_while_offline(spec.offline, spec.t0, on_offline=log_offline)

    def after_compute(seconds: float) -> None:
        time.sleep(max(0.0, spec.compute_factor - 1) * seconds)

    hooks = Hooks(before_task, after_compute, ShapedTransport(spec.link, duplicate_posts=spec.duplicate_posts))
    loop = PhoneLoop(spec.phone_dir, hooks, max_wait_s=spec.max_wait_s)
    return loop.run()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m android_harness.phone SPEC.json", file=sys.stderr)
        return 2
    try:
        pushed = run(PhoneSpec.load(Path(argv[0])))
    except FedkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except MemoryError:
        print(
            "error: out of memory under the phone's RLIMIT_AS: give the phone class more memory or plan a smaller part",
            file=sys.stderr,
        )
        return 3
    print(json.dumps({"pushed": pushed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
