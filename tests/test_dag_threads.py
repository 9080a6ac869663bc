"""Validation is safe under concurrency: every thread's verdict equals the single-threaded one.

lxml keeps a schema's errors on the schema object; a schema shared by
threads gave one request another's fault (or an IndexError). This stress
test validates valid and invalid DAGs from many threads at once.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vmshop_common.dagxml import load_dag
from vmshop_common.errors import VMShopError

DAGS = sorted((Path(__file__).resolve().parent / "dags").glob("*.xml"))
SAMPLES = sorted((Path(__file__).resolve().parent.parent / "scripts").glob("sample_*.xml"))


def verdict(path: Path) -> tuple[str, ...]:
    try:
        load_dag(path.read_bytes(), what=path.name)
    except VMShopError as exc:
        return (exc.code, str(exc), *(str(problem) for problem in exc.problems))
    except Exception as exc:  # noqa: BLE001 - any other outcome is a wrong verdict
        return ("unexpected", repr(exc))
    return ("valid",)


def test_verdicts_from_many_threads_equal_the_single_threaded_ones() -> None:
    documents = DAGS + SAMPLES
    expected = {path: verdict(path) for path in documents}
    assert {v[0] for v in expected.values()} >= {"valid", "Client.SchemaInvalid", "Client.DagInvalid"}
    assert "unexpected" not in {v[0] for v in expected.values()}
    work = [path for path in documents for _ in range(40)]
    random.Random(7).shuffle(work)
    with ThreadPoolExecutor(max_workers=16) as pool:
        got = list(pool.map(verdict, work))
    wrong = [(path.name, answer) for path, answer in zip(work, got, strict=True) if answer != expected[path]]
    assert wrong == [], wrong[:5]
