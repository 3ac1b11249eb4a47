"""``kotta demo``: a short end-to-end tour of the embedded enclave, printing what it does.

Its protected-dataset part registers a dataset and grants a role read on it: what only an
admin may do (``kotta dataset add``, ``kotta policy grant``).  It does so only as an admin,
and only in an enclave that is its own: one this run made (the quick start, a fresh
``$KOTTA_HOME``), or one where an earlier ``kotta demo`` registered its dataset (then it
says so, and touches nothing but that dataset's read grant for the caller's role).  Anywhere
else it skips that part with a note: a demo must not change a real enclave's policies.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as _dt
import os
import random
import sys
import time
import traceback

from . import config
from .backends import env_spec, is_new, open_enclave
from .errors import AccessDenied, ConfigurationError, TaskKilled, WalltimeExceeded
from .executor import KottaExecutor


def count_citations(year: int) -> int:
    """A stand-in for an analysis of a protected bibliometric corpus."""
    rng = random.Random(year)
    papers = [rng.randint(0, 50) for _ in range(20_000)]
    print(f"year {year}: counted {len(papers)} papers on pid {os.getpid()}")
    return sum(papers)


def parse_record(line: str) -> dict:
    key, value = line.split("=")  # fails on a malformed record
    return {key: int(value)}


def file_sum(inputs=()) -> int:
    """Cloud Kotta's example: sum the integers of a staged input, one per line."""
    with open(os.path.basename(inputs[0])) as f:
        return sum(int(line) for line in f)


def runs_too_long() -> None:
    time.sleep(600)


def _say(text: str) -> None:
    print(f"\n== {text}")


def run_demo(enclave: str | None = None) -> int:
    spec = os.fspath(enclave) if enclave else env_spec()
    if "://" in spec and not spec.startswith("embedded://"):
        # (aws.md has KOTTA_ENCLAVE=aws://... in a shell profile): the demo ran there, its
        # jobs on the lab's own nodes, and with none serving its queue it waited for good
        where = "--enclave" if enclave else "$KOTTA_ENCLAVE"
        raise ConfigurationError(
            f"kotta demo runs on an embedded enclave, and {where} names {spec}; run it with "
            f"--enclave DIR (a directory of its own), or with KOTTA_ENCLAVE unset")
    started = time.monotonic()
    made = is_new(enclave, default=True)  # before opening it makes it
    e = open_enclave(enclave)
    print(f"kotta demo on the enclave {e.url}")
    # no more than the test queue's cap, which a site's queues.json may set under 5
    # minutes: the demo failed at its first submit there, "over the cap of the test queue"
    cap = config.queue_limits("test").max_walltime
    with KottaExecutor(2, queue="test", walltime=min(5, cap), enclave=e) as ex, \
            _ending_its_tasks(ex):
        _say("submit: one call, run by a worker process of a local node")
        f = ex.submit(count_citations, 2019)
        print(f"job {f.job_id} -> {f.result()}   (status: {f.status()})")
        print(f"its stdout, captured on the node: {f.stdout.strip()!r}")

        _say("map: ten years, in order, as with ProcessPoolExecutor")
        years = list(range(2010, 2020))
        totals = list(ex.map(count_citations, years))
        for year, total in zip(years, totals, strict=True):
            print(f"  {year}: {total}")

        _say("a remote exception comes back as itself, with the remote traceback")
        try:
            ex.submit(parse_record, "citations: 12").result()
        except ValueError as exc:
            print("".join(traceback.format_exception(exc)).rstrip())

        _say("walltime: a task over its limit is killed, with its whole process tree")
        slow = ex.with_options(walltime=_dt.timedelta(seconds=min(2, cap * 60))).submit(
            runs_too_long)
        try:
            slow.result()
        except WalltimeExceeded as exc:
            print(f"WalltimeExceeded: {exc}   (status: {slow.status()})")

        _say("kill: a running task stops within about a second")
        running = ex.submit(runs_too_long)
        while running.status() != "processing":
            time.sleep(0.05)
        t0 = time.monotonic()
        running.kill()
        try:
            running.result()
        except TaskKilled as exc:
            print(f"TaskKilled after {time.monotonic() - t0:.2f} s: {exc}")

        _say("cancel: a task that no node has started never runs")
        # It waits for its argument, a future not done yet, so no node can have it: a task
        # queued behind the workers' running ones raced them, and a node may pipe one to a
        # busy worker, where it counts as started (cancel() -> False, "processing": the
        # demo said so now and then, under this heading)
        year = concurrent.futures.Future()
        queued = ex.submit(count_citations, year)
        print(f"cancel() -> {queued.cancel()}   (status: {queued.status()})")
        year.set_result(1999)

        _say("a protected dataset: staged in for a role with a grant, audited, denied otherwise")
        data_ids = _data_demo(e, ex, made)

        _say("the job table: every job ended completed, failed (with a reason) or cancelled")
        ids = [f.job_id, slow.job_id, running.job_id, queued.job_id, *data_ids]
        records = e.jobs.get_many(ids)
        for job in (records[i] for i in ids if i in records):
            reason = f"  ({job.reason})" if job.reason else ""
            print(f"  {job.job_id}  {job.state:10} {job.fn}{reason}")
        # (with the enclave it ran on, unless the default: without it, they looked in the
        # default one, and said "no job")
        where = ex._cli_enclave()
        print(f"\nsee one with:  kotta status {f.job_id}{where}   or   "
              f"kotta logs {f.job_id}{where}")
    print(f"\ndemo finished in {time.monotonic() - started:.1f} s")
    return 0


@contextlib.contextmanager
def _ending_its_tasks(ex: KottaExecutor):
    """The demo's tasks end with it: on Ctrl-C (or an error) they are killed or cancelled.
    The end of the ``with`` block waited for them, as for any executor's: interrupted as
    its ten-minute task started, the demo waited for it up to its walltime (5 minutes), a
    second Ctrl-C too (the end of the interpreter waited then); killed, it left the task
    handed back, to run on the next node."""
    try:
        yield
    except BaseException:
        ex.terminate_workers()
        raise


#: the demo's own dataset: its existence marks an enclave where an earlier demo ran
DEMO_DATASET = "s3://demo-corpus/"


def _data_demo(e, ex: KottaExecutor, made: bool) -> list[str]:
    """The protected-dataset part; ``made``: this run made the enclave.  Skipped, with a
    note, where the demo may not or should not change the enclave's policies."""
    from .security.audit import AuditLog
    from .security.credentials import load
    from .security.data import put_object
    from .security.policy import PolicyStore

    me = load(e).check("kotta demo")
    audit = AuditLog(e)
    policies = PolicyStore(e.records, audit)
    skip = _skip_data_demo(e, me, made, policies)
    if skip:
        print(f"skipped: {skip}")
        return []
    uri = DEMO_DATASET + "1m_shuffled.txt"
    if policies.dataset(DEMO_DATASET) is None:  # in the enclave this run made
        policies.add_dataset(DEMO_DATASET, by=me.user, description="kotta demo numbers")
    else:  # as it is: its egress rule is an admin's to set
        print(f"note: {e.url} has the dataset {DEMO_DATASET} of an earlier `kotta demo`: the "
              f"demo uses it again, and revokes, then grants, the role {me.role} read on it")
    # audited first, as `kotta dataset put`: no object is written unaudited
    audit.append("stage-out", user=me.user, dataset=uri, allowed=True, detail="kotta demo")
    put_object(e, uri, "".join(f"{i}\n" for i in random.Random(7).sample(range(10**6), 1000)).encode())
    policies.revoke(me.role, DEMO_DATASET, "read", by=me.user)
    denied = ex.submit(file_sum, inputs=[uri])
    try:
        denied.result()
    except PermissionError as exc:
        print(f"without a grant: {type(exc).__name__}: {exc}")
    policies.grant(me.role, DEMO_DATASET, "read", by=me.user)
    print(f"kotta policy grant {me.role} {DEMO_DATASET} read")
    ok = ex.submit(file_sum, inputs=[uri])
    print(f"file_sum(inputs=[{uri!r}]) -> {ok.result()}")
    for rec in audit.show(job_id=denied.job_id) + audit.show(job_id=ok.job_id):
        verdict = "allowed" if rec["allowed"] else "DENIED"
        print(f"  audit #{rec['seq']}: {rec['user']} {rec['action']} {rec['dataset']} {verdict}")
    report = audit.verify()
    print(f"kotta audit verify: {'OK' if report.ok else 'TAMPERED'}, {report.records} records")
    return [denied.job_id, ok.job_id]


def _skip_data_demo(e, me, made: bool, policies) -> str | None:
    """Why the demo leaves the enclave's datasets and policies alone (None: it may set up
    its own).  The admin check is ``kotta dataset add``'s and ``kotta policy grant``'s."""
    from .security.commands import require_admin

    try:
        require_admin(e, me)
    except AccessDenied:
        return (f"registering the demo's dataset and granting a role read on it takes an "
                f"admin of the enclave ({me.user} is not one), as `kotta dataset add` and "
                "`kotta policy grant` do")
    if made or any(ds.uri == DEMO_DATASET for ds in policies.datasets()):
        return None
    return (f"the enclave {e.url} existed before this demo, and the demo changes no "
            "enclave's datasets or policies but its own; to see this part, run `kotta "
            "demo` with a fresh KOTTA_HOME (or --enclave NEWDIR)")


if __name__ == "__main__":
    sys.exit(run_demo())
