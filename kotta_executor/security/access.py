"""Who may see, cancel and kill a job: its owner, and admins.  Every refusal is audited.

The original Cloud Kotta server had a status route without authentication and a cancel
without an ownership check; here every path to another user's job (``attach``,
``kotta status / logs / cancel / jobs``) goes through :func:`check_job_access`.
"""

from __future__ import annotations

from ..errors import AccessDenied


def may_access(creds, owner: str) -> bool:
    return creds.admin or creds.user == owner


def check_job_access(enclave, creds, job, verb: str) -> None:
    """Raise AccessDenied (and audit it) unless ``creds`` may act on ``job``."""
    if may_access(creds, job.owner):
        return
    deny(enclave, creds, job, verb)


def deny(enclave, creds, job, verb: str):
    """Audit a refused job operation (``job`` None: one over all users' jobs) and raise."""
    from .audit import AuditLog

    AuditLog(enclave).append(
        "job-denied", user=creds.user, allowed=False, job_id=job.job_id if job else None,
        detail=f"{verb} a job of {job.owner}" if job else verb,
    )
    if job is None:
        raise AccessDenied(f"only admins may {verb} ({creds.user} is not one)")
    raise AccessDenied(
        f"job {job.job_id} belongs to {job.owner}; {creds.user} may not {verb} it "
        "(only its owner and admins may)"
    )
