"""``pvctl dev up`` and ``pvctl dev down`` on the sim backend, as a new user runs them.

Up starts a real agent and controller and writes ``dev.json``; a started
instance is served; down stops the instance, both processes and removes the
agent's runtime directory (it lives below the temp dir, outside DIR, so that
socket paths stay short; nothing else would remove it).
"""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Any

from controller import cli
from hostagent import process


def pvctl(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def alive(pid: int) -> bool:
    return process.start_ticks(pid) is not None


def test_dev_up_serves_and_dev_down_stops_everything(tmp_path: Path) -> None:
    directory = tmp_path / "dev"
    code, out, err = pvctl("dev", "up", str(directory), "--backend", "sim", "--json")
    assert code == 0, err
    document: dict[str, Any] = json.loads(out)
    runtime = Path(document["runtime_dir"])
    try:
        assert alive(document["agent_pid"]) and alive(document["controller_pid"]) and runtime.is_dir()
        assert json.loads((directory / "dev.json").read_text()) == document
        instance = str(uuid.uuid4())
        code, out, err = pvctl("start", instance, "--vcpus", "1", "--memory-mib", "64",
                               "--image-digest", document["image_digest"],
                               "--image-signature", document["image_signature"], "--dev", str(directory), "--json")
        assert code == 0, err
        code, out, err = pvctl("dev", "up", str(directory), "--backend", "sim")
        assert code != 0 and "already running" in err  # one development host per directory
    finally:
        code, out, err = pvctl("dev", "down", str(directory), "--json")
    assert code == 0, err
    down = json.loads(out)
    assert down["stopped_instances"] == [instance]
    assert down["runtime_dir_removed"] is True and not runtime.exists()
    assert not alive(document["agent_pid"]) and not alive(document["controller_pid"])
    assert not (directory / "dev.json").exists()
    code, out, err = pvctl("dev", "down", str(directory))
    assert code != 0 and "no development host" in err
