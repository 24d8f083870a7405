"""What a run asks the Hugging Face Hub before anything heavy loads: can ``--teacher`` be downloaded, can
``--push-to-hub`` upload. Torch-free (huggingface_hub only, imported on first use); each question is one request with
a timeout and no retries, so a bad repo id, a missing token or a missing network is refused within seconds, with the
flag's name, instead of after a long retry loop or after the whole run.

Answers are kept for the life of the process (the command line asks, then ``distill`` asks again for callers that
skip the command line), keyed by endpoint and token so that another Hub or another login asks anew.
"""

from __future__ import annotations

import functools
import os
import shlex

TIMEOUT = 10.0  # seconds per request


def is_hub_id(source: str) -> bool:
    """``org/name`` that is not a path on this machine (the config check refuses other non-paths)."""
    return source != "digits" and not os.path.exists(source) and source.count("/") == 1 and not source.startswith((".", "~", "/"))


def check_run(config, teacher: bool = True) -> bool:
    """Refuse (ValueError naming the flag) a ``--teacher`` Hub id that can neither be downloaded nor found in the
    local cache, and a ``--push-to-hub`` that could not upload. Returns True when the teacher must load from the
    local cache (the Hub is offline or unreachable, but the pipeline is cached)."""
    if config.push_to_hub:
        check_push(config.push_to_hub)
    if teacher and is_hub_id(config.teacher):
        return _teacher_cached_only(config.teacher, *_hub_state())
    return False


def check_push(repo_id: str, flag: str = "--push-to-hub") -> None:
    """The repo id is valid, a token is there, the Hub answers and takes it, and it may write to that namespace."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if repo_id.count("/") > 1:
            raise HFValidationError("at most one '/'")
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(f"{flag} {repo_id!r} is not a Hub repo id: use 'name' or 'user/name' (letters, digits, '-', '_', '.').") from None
    user = _whoami(flag, repo_id, *_hub_state())
    namespace = repo_id.split("/")[0] if "/" in repo_id else user["name"]
    allowed = [user["name"]] + [org["name"] for org in user.get("orgs", [])]
    if namespace not in allowed:
        raise ValueError(f"{flag} {repo_id}: the Hub token is {user['name']}'s, which may write to {', '.join(allowed)}, not {namespace}.")


def push_command(run_dir: str, repo_id: str) -> str:
    """The command that uploads a run's student (as ``--push-to-hub`` does)."""
    return f"onestep-train push {shlex.quote(run_dir)} --repo-id {shlex.quote(repo_id)}"


# ------------------------------------------------------------------------------------------------- requests
def _hub_state() -> tuple[str, bool, str | None]:
    """``(endpoint, offline, token)`` as huggingface_hub sees them now (the cache key of the answers)."""
    from huggingface_hub import constants, get_token

    return constants.ENDPOINT, bool(constants.HF_HUB_OFFLINE), get_token()


@functools.lru_cache(maxsize=None)
def _teacher_cached_only(repo_id: str, endpoint: str, offline: bool, token: str | None) -> bool:
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    cached = isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)
    if offline:
        if cached:
            return True
        raise ValueError(f"--teacher {repo_id}: HF_HUB_OFFLINE is set and the Hub cache ({constants.HF_HUB_CACHE}) holds no copy of it; "
                         f"unset HF_HUB_OFFLINE, or download it first (`hf download {repo_id}`), or pass a pipeline folder.")
    try:
        HfApi(endpoint=endpoint, token=token).model_info(repo_id, timeout=TIMEOUT)
    except GatedRepoError:
        raise ValueError(f"--teacher {repo_id} is gated: accept its conditions on {endpoint}/{repo_id} and log in (`hf auth login` or HF_TOKEN).") from None
    except RepositoryNotFoundError:
        login = "" if token else "; if it is private, log in first (`hf auth login` or HF_TOKEN)"
        raise ValueError(f"--teacher {repo_id}: no such model on the Hub ({endpoint}){login}.") from None
    except HfHubHTTPError as error:
        raise ValueError(f"--teacher {repo_id}: the Hub ({endpoint}) answered {error_reason(error)}.") from None
    except Exception as error:  # no network, DNS, proxy, timeout: the transport's own classes
        if cached:
            print(f"the Hub ({endpoint}) cannot be reached ({error_reason(error)}): --teacher {repo_id} loads from the local cache")
            return True
        raise ValueError(f"--teacher {repo_id}: cannot reach the Hub ({endpoint}: {error_reason(error)}) and the local cache holds no copy; "
                         "connect, or pass a pipeline folder.") from None
    return False


@functools.lru_cache(maxsize=None)
def _whoami(flag: str, repo_id: str, endpoint: str, offline: bool, token: str | None) -> dict:
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    if offline:
        raise ValueError(f"{flag} {repo_id} uploads to the Hub, and HF_HUB_OFFLINE is set: unset it, or train without {flag} "
                         f"and upload later with `{push_command('RUN_DIR', repo_id)}`.")
    if not token:
        raise ValueError(f"{flag} {repo_id} needs a Hub token with write access: set HF_TOKEN or run `hf auth login`.")
    try:
        response = get_session().get(f"{endpoint}/api/whoami-v2", headers=build_hf_headers(token=token), timeout=TIMEOUT)
        hf_raise_for_status(response)
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code == 401:
            raise ValueError(f"{flag} {repo_id}: the Hub ({endpoint}) refuses the token (from HF_TOKEN or `hf auth login`); "
                             "log in again with a write token.") from None
        raise ValueError(f"{flag} {repo_id}: the Hub ({endpoint}) answered {error_reason(error)}.") from None
    except Exception as error:  # no network, DNS, proxy, timeout
        raise ValueError(f"{flag} {repo_id}: cannot reach the Hub ({endpoint}: {error_reason(error)}); connect, or train without {flag} "
                         f"and upload later with `{push_command('RUN_DIR', repo_id)}`.") from None
    user = response.json()
    if user.get("auth", {}).get("accessToken", {}).get("role") == "read":
        raise ValueError(f"{flag} {repo_id}: the Hub token is a read token; log in with a write token (`hf auth login`).")
    return user


def error_reason(error: Exception) -> str:
    """The first line of an error, with its class when that says more than the text (``ConnectError: ...``)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
