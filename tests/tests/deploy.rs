//! The Kubernetes manifests in deploy/, checked offline.
//!
//! - `kubectl kustomize deploy/` must render, and every rendered object and
//!   every example must pass `kubernetes-validate --strict` (Kubernetes' own
//!   OpenAPI schemas, no unknown fields) for [`KUBERNETES`]. The
//!   VolumeSnapshotClass is a CRD kind the validator has no schema for: it
//!   is checked field by field here instead.
//! - What no schema can see is asserted one fact at a time: the driver name
//!   agrees everywhere, the CSI socket paths line up between the plugin, its
//!   sidecars, their shared volumes and the kubelet's registration path,
//!   every ServiceAccount exists and is bound to what its sidecars need, the
//!   node plugin's mounts reach the host (Bidirectional, privileged), the
//!   headless Service finds the node daemons, and the StorageClass carries
//!   exactly the parameters of the issue.
//!
//! The tools (kubectl, and kubernetes-validate in the virtualenv
//! [`VENV`]) come from scripts/install-test-deps.sh; a missing tool fails
//! the test, it never skips. The YAML is turned into JSON by the
//! virtualenv's Python (PyYAML comes with kubernetes-validate).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use corral_tests::run_bounded;
use corral_tests::tools::require;
use serde_json::Value;

/// The Kubernetes version the schemas are taken from.
const KUBERNETES: &str = "1.33.0";
/// Where scripts/install-test-deps.sh puts kubernetes-validate
/// (`CORRAL_VENV` overrides).
const VENV: &str = "/opt/corral-venv";
const DRIVER: &str = "csi.corral.io";
const NAMESPACE: &str = "corral-system";
const IMAGE: &str = "ghcr.io/corral-io/corral:0.1.0";
const LIMIT: Duration = Duration::from_secs(120);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn venv_tool(name: &str) -> Result<PathBuf> {
    let venv = std::env::var("CORRAL_VENV").unwrap_or_else(|_| VENV.into());
    let tool = Path::new(&venv).join("bin").join(name);
    if !tool.is_file() {
        bail!(
            "{} is missing: kubernetes-validate is not installed in the virtualenv {venv}; \
             run scripts/install-test-deps.sh (or scripts/test.sh)",
            tool.display()
        );
    }
    Ok(tool)
}

fn run(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = run_bounded(cmd, LIMIT)?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Every document of a YAML stream, as JSON (empty documents dropped).
fn parse_yaml(path: &Path) -> Result<Vec<Value>> {
    let python = venv_tool("python3")?;
    let script = "import json, sys, yaml\n\
                  docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
                  json.dump(docs, sys.stdout)\n";
    let json = run(Command::new(python).arg("-c").arg(script).arg(path))
        .with_context(|| format!("parse {}", path.display()))?;
    Ok(serde_json::from_str(&json)?)
}

/// `kubectl kustomize deploy/`, kept in a file for the validator.
struct Rendered {
    _dir: tempfile::TempDir,
    file: PathBuf,
    objects: Vec<Value>,
}

fn render() -> Result<Rendered> {
    let kubectl = require("kubectl")?;
    let yaml = run(Command::new(kubectl)
        .arg("kustomize")
        .arg(repo().join("deploy")))?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, yaml)?;
    let objects = parse_yaml(&file)?;
    Ok(Rendered {
        _dir: dir,
        file,
        objects,
    })
}

/// The rendered objects, made once for all the tests of this file.
fn rendered() -> &'static Rendered {
    static RENDERED: OnceLock<Rendered> = OnceLock::new();
    RENDERED.get_or_init(|| render().expect("render deploy/ and read it back"))
}

fn objects() -> &'static [Value] {
    &rendered().objects
}

fn kind_of(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or("")
}

fn name_of(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or("")
}

/// The one rendered object of this kind and name.
fn object(kind: &str, name: &str) -> &'static Value {
    let found: Vec<&Value> = objects()
        .iter()
        .filter(|o| kind_of(o) == kind && name_of(o) == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} {name}, found {}",
        found.len()
    );
    found[0]
}

fn only(kind: &str) -> &'static Value {
    let found: Vec<&Value> = objects().iter().filter(|o| kind_of(o) == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn containers(workload: &Value) -> Vec<&Value> {
    let spec = pod_spec(workload);
    let mut all = Vec::new();
    for list in ["initContainers", "containers"] {
        if let Some(cs) = spec[list].as_array() {
            all.extend(cs.iter());
        }
    }
    all
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    containers(workload)
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("{} has no container {name}", name_of(workload)))
}

fn args(c: &Value) -> Vec<&str> {
    c["args"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The value of `--flag` in a container's args, as `--flag=value` or
/// `--flag value`.
fn flag<'a>(c: &'a Value, name: &str) -> Option<&'a str> {
    let args = args(c);
    let eq = format!("{name}=");
    for (i, a) in args.iter().enumerate() {
        if let Some(v) = a.strip_prefix(&eq) {
            return Some(v);
        }
        if *a == name {
            return args.get(i + 1).copied();
        }
    }
    None
}

fn has_flag(c: &Value, name: &str) -> bool {
    args(c)
        .iter()
        .any(|a| *a == name || a.starts_with(&format!("{name}=")))
}

/// The container running `corral csi` in a workload.
fn plugin(workload: &Value) -> &Value {
    let found: Vec<&Value> = containers(workload)
        .into_iter()
        .filter(|c| c["image"] == IMAGE && args(c).first() == Some(&"csi"))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{}: expected one `corral csi` container",
        name_of(workload)
    );
    found[0]
}

/// Which volume a container mounts at `path`, if any.
fn volume_at<'a>(c: &'a Value, path: &str) -> Option<&'a Value> {
    c["volumeMounts"]
        .as_array()?
        .iter()
        .find(|m| m["mountPath"].as_str().map(|p| p.trim_end_matches('/')) == Some(path))
}

fn pod_volume<'a>(workload: &'a Value, name: &str) -> &'a Value {
    pod_spec(workload)["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == name))
        .unwrap_or_else(|| panic!("{} has no volume {name}", name_of(workload)))
}

/// A unix endpoint as a plain path (`unix:///csi/csi.sock` -> `/csi/csi.sock`).
fn socket_path(endpoint: &str) -> &str {
    endpoint.strip_prefix("unix://").unwrap_or(endpoint)
}

fn controller() -> &'static Value {
    object("Deployment", "corral-csi-controller")
}

fn node() -> &'static Value {
    object("DaemonSet", "corral-node")
}

fn kubernetes_validate(file: &Path) -> Result<String> {
    let validate = venv_tool("kubernetes-validate")?;
    let out = run_bounded(
        Command::new(validate)
            .args(["--strict", "--kubernetes-version", KUBERNETES])
            .arg(file),
        LIMIT,
    )?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("kubernetes-validate rejects {}:\n{text}", file.display());
    }
    Ok(text)
}

/// Kinds the validator has no schema for, from its warnings.
fn unvalidated_kinds(report: &str) -> BTreeSet<String> {
    report
        .lines()
        .filter_map(|l| l.split("Couldn't find schema for kind ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------
// Rendering and schemas
// ---------------------------------------------------------------------------

#[test]
fn the_kustomization_renders_every_manifest() {
    let kinds: BTreeMap<&str, usize> = objects().iter().fold(BTreeMap::new(), |mut m, o| {
        *m.entry(kind_of(o)).or_default() += 1;
        m
    });
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "CSIDriver",
        "DaemonSet",
        "Service",
        "Deployment",
        "StorageClass",
        "VolumeSnapshotClass",
    ] {
        assert!(kinds.contains_key(kind), "no {kind} rendered: {kinds:?}");
    }
    assert_eq!(name_of(only("Namespace")), NAMESPACE);
}

#[test]
fn namespaced_objects_live_in_corral_system_and_cluster_objects_in_none() {
    const CLUSTER_SCOPED: [&str; 6] = [
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CSIDriver",
        "StorageClass",
        "VolumeSnapshotClass",
    ];
    for o in objects() {
        let ns = o["metadata"]["namespace"].as_str();
        if CLUSTER_SCOPED.contains(&kind_of(o)) {
            assert_eq!(ns, None, "{} {} is cluster-scoped", kind_of(o), name_of(o));
        } else {
            assert_eq!(ns, Some(NAMESPACE), "{} {}", kind_of(o), name_of(o));
        }
    }
}

#[test]
fn every_rendered_object_passes_the_kubernetes_schemas_strictly() {
    let report = kubernetes_validate(&rendered().file).unwrap();
    assert_eq!(
        unvalidated_kinds(&report),
        BTreeSet::from(["VolumeSnapshotClass".to_string()]),
        "only the snapshot CRD kind may lack a schema (checked by hand below):\n{report}"
    );
}

#[test]
fn the_validator_does_reject_an_unknown_field() {
    // A control: the strict validation above would pass anything if the
    // validator silently had no schemas.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    let class = std::fs::read_to_string(repo().join("deploy/storageclass.yaml")).unwrap();
    std::fs::write(
        &file,
        class.replace("provisioner:", "provisoner: x\nprovisioner:"),
    )
    .unwrap();
    let err = kubernetes_validate(&file).expect_err("a misspelt field must be rejected");
    assert!(err.to_string().contains("provisoner"), "{err:#}");
}

#[test]
fn every_example_passes_the_kubernetes_schemas_strictly() {
    let dir = repo().join("deploy/examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in ["mysql.yaml", "pvc.yaml", "statefulset.yaml"] {
        assert!(
            names.iter().any(|n| n == expected),
            "no example {expected}: {names:?}"
        );
    }
    for file in &files {
        let report = kubernetes_validate(file).unwrap();
        // The backups example has the snapshot CRD kinds, which are
        // checked by hand (the_backups_example_is_well_formed...).
        let allowed: BTreeSet<String> = if file.ends_with("backups.yaml") {
            ["VolumeSnapshotClass", "VolumeSnapshot"]
                .map(String::from)
                .into()
        } else {
            BTreeSet::new()
        };
        assert!(
            unvalidated_kinds(&report).is_subset(&allowed),
            "{}: kinds without a schema:\n{report}",
            file.display()
        );
    }
}

#[test]
fn the_backups_example_is_well_formed_and_its_parameters_parse() {
    use corral_csi::params::VolumeParams;
    use corral_csi::snapshots::{SnapshotKind, snapshot_class};
    let docs = parse_yaml(&repo().join("deploy/examples/backups.yaml")).unwrap();
    let of_kind =
        |kind: &str| -> Vec<&Value> { docs.iter().filter(|d| kind_of(d) == kind).collect() };
    let strings = |v: &Value| -> std::collections::HashMap<String, String> {
        v.as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().expect("string values").to_string()))
                    .collect()
            })
            .unwrap_or_default()
    };
    // The backup-typed VolumeSnapshotClass: the CRD's fields only, and
    // parameters corral takes as a backup.
    let [class] = of_kind("VolumeSnapshotClass")[..] else {
        panic!("one VolumeSnapshotClass in backups.yaml");
    };
    assert_eq!(class["apiVersion"], "snapshot.storage.k8s.io/v1");
    assert_eq!(class["driver"], DRIVER);
    let keys: BTreeSet<&str> = class
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert!(
        keys.is_subset(&BTreeSet::from([
            "apiVersion",
            "kind",
            "metadata",
            "driver",
            "deletionPolicy",
            "parameters",
        ])),
        "{keys:?}"
    );
    let kind = snapshot_class(&strings(&class["parameters"])).expect("parameters corral takes");
    assert!(matches!(kind, SnapshotKind::Backup { .. }), "{kind:?}");
    // The VolumeSnapshot takes it, of the PVC of pvc.yaml.
    let [snapshot] = of_kind("VolumeSnapshot")[..] else {
        panic!("one VolumeSnapshot in backups.yaml");
    };
    assert_eq!(snapshot["apiVersion"], "snapshot.storage.k8s.io/v1");
    assert_eq!(
        snapshot["spec"]["volumeSnapshotClassName"],
        class["metadata"]["name"]
    );
    let pvc_example = parse_yaml(&repo().join("deploy/examples/pvc.yaml")).unwrap();
    let demo = pvc_example
        .iter()
        .find(|d| kind_of(d) == "PersistentVolumeClaim")
        .expect("pvc.yaml has a PVC");
    assert_eq!(
        snapshot["spec"]["source"]["persistentVolumeClaimName"],
        demo["metadata"]["name"]
    );
    // The fromBackup StorageClass: parameters corral takes.
    let [restoring] = of_kind("StorageClass")[..] else {
        panic!("one StorageClass in backups.yaml");
    };
    assert_eq!(restoring["provisioner"], DRIVER);
    let params = VolumeParams::parse(&strings(&restoring["parameters"])).expect("parameters");
    assert!(params.from_backup.is_some());
    // Every PVC asks for a class that exists, and a data source that does.
    let mut classes: BTreeSet<&str> = objects()
        .iter()
        .filter(|o| kind_of(o) == "StorageClass")
        .map(name_of)
        .collect();
    classes.insert(name_of(restoring));
    for pvc in of_kind("PersistentVolumeClaim") {
        let class = pvc["spec"]["storageClassName"].as_str().unwrap();
        assert!(classes.contains(class), "{}: class {class}", name_of(pvc));
        if let Some(source) = pvc["spec"].get("dataSource") {
            assert_eq!(source["kind"], "VolumeSnapshot");
            assert_eq!(source["name"], snapshot["metadata"]["name"]);
        }
    }
    // The Secret the pods read their keys from, in corral's namespace.
    let [secret] = of_kind("Secret")[..] else {
        panic!("one Secret in backups.yaml");
    };
    assert_eq!(secret["metadata"]["namespace"], NAMESPACE);
    let in_secret: BTreeSet<&str> = secret["stringData"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for c in [container(node(), "corral-node"), plugin(controller())] {
        let refs: Vec<&Value> = c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["valueFrom"].get("secretKeyRef"))
            .filter(|r| r["name"] == name_of(secret))
            .collect();
        assert!(refs.len() >= 3, "{} reads no S3 keys", c["name"]);
        for r in refs {
            assert_eq!(r["optional"], true, "{}: {r}", c["name"]);
            assert!(
                in_secret.contains(r["key"].as_str().unwrap()),
                "{}: {r} is not in the example Secret",
                c["name"]
            );
        }
    }
}

#[test]
fn the_volume_snapshot_class_is_well_formed() {
    // No schema for this CRD kind in the validator: check its shape here
    // (snapshot.storage.k8s.io/v1 VolumeSnapshotClass: driver and
    // deletionPolicy required, parameters optional, nothing else).
    let class = object("VolumeSnapshotClass", "corral-snapshots");
    assert_eq!(class["apiVersion"], "snapshot.storage.k8s.io/v1");
    let keys: BTreeSet<&str> = class
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let allowed = BTreeSet::from([
        "apiVersion",
        "kind",
        "metadata",
        "driver",
        "deletionPolicy",
        "parameters",
    ]);
    assert!(
        keys.is_subset(&allowed),
        "unexpected fields: {:?}",
        keys.difference(&allowed)
    );
    assert_eq!(class["deletionPolicy"], "Delete");
    assert!(class["driver"].is_string());
    if let Some(params) = class.get("parameters") {
        assert!(params.as_object().unwrap().values().all(Value::is_string));
    }
    let meta: BTreeSet<&str> = class["metadata"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert!(
        meta.is_subset(&BTreeSet::from(["name", "labels", "annotations"])),
        "{meta:?}"
    );
}

// ---------------------------------------------------------------------------
// What the schemas cannot see
// ---------------------------------------------------------------------------

#[test]
fn the_driver_name_agrees_everywhere() {
    assert_eq!(name_of(only("CSIDriver")), DRIVER);
    for class in objects().iter().filter(|o| kind_of(o) == "StorageClass") {
        assert_eq!(
            class["provisioner"],
            DRIVER,
            "StorageClass {}",
            name_of(class)
        );
    }
    assert_eq!(only("VolumeSnapshotClass")["driver"], DRIVER);
    let registrar = container(node(), "node-driver-registrar");
    assert_eq!(
        flag(registrar, "--kubelet-registration-path"),
        Some(format!("/var/lib/kubelet/plugins/{DRIVER}/csi.sock").as_str())
    );
    // The examples ask for classes that deploy/ provides.
    let classes: BTreeSet<&str> = objects()
        .iter()
        .filter(|o| kind_of(o) == "StorageClass")
        .map(name_of)
        .collect();
    for example in ["pvc.yaml", "statefulset.yaml", "mysql.yaml"] {
        let docs = parse_yaml(&repo().join("deploy/examples").join(example)).unwrap();
        let mut asked = Vec::new();
        for d in &docs {
            if kind_of(d) == "PersistentVolumeClaim" {
                asked.push(d["spec"]["storageClassName"].clone());
            }
            for t in d["spec"]["volumeClaimTemplates"]
                .as_array()
                .into_iter()
                .flatten()
            {
                asked.push(t["spec"]["storageClassName"].clone());
            }
        }
        assert!(!asked.is_empty(), "{example} claims no volume");
        for class in asked {
            assert!(
                class.as_str().is_some_and(|c| classes.contains(c)),
                "{example} asks for class {class}, deploy/ has {classes:?}"
            );
        }
    }
}

#[test]
fn the_csi_driver_object_is_as_the_issue_asks() {
    let spec = &only("CSIDriver")["spec"];
    assert_eq!(spec["attachRequired"], true);
    assert_eq!(spec["podInfoOnMount"], false);
    assert_eq!(
        spec["volumeLifecycleModes"],
        serde_json::json!(["Persistent"])
    );
    assert_eq!(spec["fsGroupPolicy"], "File");
}

#[test]
fn socket_paths_agree_between_the_plugin_its_sidecars_and_their_volumes() {
    for workload in [controller(), node()] {
        let name = name_of(workload);
        let plugin = plugin(workload);
        let endpoint = flag(plugin, "--endpoint").expect("corral csi --endpoint");
        assert!(endpoint.starts_with("unix:///"), "{name}: {endpoint}");
        let socket = Path::new(socket_path(endpoint));
        let dir = socket.parent().unwrap().to_str().unwrap();
        let shared = volume_at(plugin, dir)
            .unwrap_or_else(|| panic!("{name}: corral-csi mounts nothing at {dir}"))["name"]
            .as_str()
            .unwrap();
        let mut sidecars = 0;
        for c in containers(workload) {
            let Some(address) = flag(c, "--csi-address") else {
                continue;
            };
            sidecars += 1;
            let who = c["name"].as_str().unwrap();
            assert_eq!(Path::new(socket_path(address)), socket, "{name}/{who}");
            let mounted =
                volume_at(c, dir).unwrap_or_else(|| panic!("{name}/{who} does not mount {dir}"));
            assert_eq!(
                mounted["name"], shared,
                "{name}/{who} mounts another volume at {dir}"
            );
        }
        assert!(sidecars >= 2, "{name}: only {sidecars} sidecars found");
        if workload == node() {
            // The kubelet finds the socket on the host, where the shared
            // volume puts it.
            let host = pod_volume(workload, shared)["hostPath"]["path"]
                .as_str()
                .expect("the node plugin's socket dir is a hostPath");
            let on_host = Path::new(host).join(socket.file_name().unwrap());
            let registrar = container(workload, "node-driver-registrar");
            assert_eq!(
                flag(registrar, "--kubelet-registration-path").map(Path::new),
                Some(on_host.as_path())
            );
            let registration =
                volume_at(registrar, "/registration").expect("the registrar mounts /registration");
            assert_eq!(
                pod_volume(workload, registration["name"].as_str().unwrap())["hostPath"]["path"]
                    .as_str()
                    .map(|p| p.trim_end_matches('/')),
                Some("/var/lib/kubelet/plugins_registry")
            );
        } else {
            assert!(
                pod_volume(workload, shared).get("emptyDir").is_some(),
                "{name}: the controller's socket stays inside the pod"
            );
        }
    }
}

/// What a ServiceAccount may do, from every binding that names it.
fn permissions(sa: &str, namespace: &str) -> Vec<(Value, Option<String>)> {
    // (rule, namespace it applies in: None = cluster-wide)
    let mut rules = Vec::new();
    for binding in objects()
        .iter()
        .filter(|o| matches!(kind_of(o), "RoleBinding" | "ClusterRoleBinding"))
    {
        let names_sa = binding["subjects"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| {
                s["kind"] == "ServiceAccount" && s["name"] == sa && s["namespace"] == namespace
            });
        if !names_sa {
            continue;
        }
        let role_ref = &binding["roleRef"];
        assert_eq!(role_ref["apiGroup"], "rbac.authorization.k8s.io");
        let role_kind = role_ref["kind"].as_str().unwrap();
        let role = object(role_kind, role_ref["name"].as_str().unwrap());
        let scope = match kind_of(binding) {
            "ClusterRoleBinding" => None,
            _ => binding["metadata"]["namespace"]
                .as_str()
                .map(str::to_string),
        };
        if role_kind == "Role" {
            assert_eq!(
                role["metadata"]["namespace"],
                binding["metadata"]["namespace"],
                "RoleBinding {} refers to a Role in another namespace",
                name_of(binding)
            );
        }
        for rule in role["rules"].as_array().into_iter().flatten() {
            rules.push((rule.clone(), scope.clone()));
        }
    }
    rules
}

fn allows(
    rules: &[(Value, Option<String>)],
    namespace: &str,
    group: &str,
    resource: &str,
    verb: &str,
) -> bool {
    let has = |v: &Value, want: &str| {
        v.as_array()
            .is_some_and(|a| a.iter().any(|x| x == want || x == "*"))
    };
    rules.iter().any(|(rule, scope)| {
        scope.as_deref().is_none_or(|s| s == namespace)
            && has(&rule["apiGroups"], group)
            && has(&rule["resources"], resource)
            && has(&rule["verbs"], verb)
    })
}

/// What each sidecar cannot work without: (API group, resource, verbs),
/// from the sidecars' own RBAC examples.
fn needs(image: &str) -> Vec<(&'static str, &'static str, &'static [&'static str])> {
    let name = image.rsplit('/').next().unwrap().split(':').next().unwrap();
    match name {
        "csi-provisioner" => vec![
            (
                "",
                "persistentvolumes",
                &["get", "list", "watch", "create", "delete"],
            ),
            (
                "",
                "persistentvolumeclaims",
                &["get", "list", "watch", "update"],
            ),
            ("", "events", &["create", "patch"]),
            ("", "nodes", &["get", "list", "watch"]),
            (
                "storage.k8s.io",
                "storageclasses",
                &["get", "list", "watch"],
            ),
            ("storage.k8s.io", "csinodes", &["get", "list", "watch"]),
            (
                "storage.k8s.io",
                "volumeattachments",
                &["get", "list", "watch"],
            ),
            (
                "snapshot.storage.k8s.io",
                "volumesnapshots",
                &["get", "list"],
            ),
            (
                "snapshot.storage.k8s.io",
                "volumesnapshotcontents",
                &["get", "list"],
            ),
        ],
        "csi-attacher" => vec![
            ("", "persistentvolumes", &["get", "list", "watch", "patch"]),
            ("storage.k8s.io", "csinodes", &["get", "list", "watch"]),
            (
                "storage.k8s.io",
                "volumeattachments",
                &["get", "list", "watch", "patch"],
            ),
            ("storage.k8s.io", "volumeattachments/status", &["patch"]),
        ],
        "csi-resizer" => vec![
            ("", "persistentvolumes", &["get", "list", "watch", "patch"]),
            ("", "persistentvolumeclaims", &["get", "list", "watch"]),
            ("", "persistentvolumeclaims/status", &["patch"]),
            ("", "pods", &["get", "list", "watch"]),
            ("", "events", &["create", "patch"]),
        ],
        "csi-snapshotter" => vec![
            ("", "events", &["create", "patch"]),
            (
                "snapshot.storage.k8s.io",
                "volumesnapshotclasses",
                &["get", "list", "watch"],
            ),
            (
                "snapshot.storage.k8s.io",
                "volumesnapshotcontents",
                &["get", "list", "watch", "update", "patch"],
            ),
            (
                "snapshot.storage.k8s.io",
                "volumesnapshotcontents/status",
                &["update", "patch"],
            ),
        ],
        // Talk only to the plugin's socket and the kubelet.
        "csi-node-driver-registrar" | "livenessprobe" => vec![],
        other => panic!("unknown sidecar image {other}: say what it needs"),
    }
}

#[test]
fn every_service_account_exists_and_is_bound_to_what_its_sidecars_need() {
    for workload in [controller(), node()] {
        let name = name_of(workload);
        let ns = workload["metadata"]["namespace"].as_str().unwrap();
        let sa = pod_spec(workload)["serviceAccountName"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} names no ServiceAccount"));
        let account = object("ServiceAccount", sa);
        assert_eq!(account["metadata"]["namespace"], ns, "ServiceAccount {sa}");
        let rules = permissions(sa, ns);
        for c in containers(workload) {
            let image = c["image"].as_str().unwrap();
            if image == IMAGE {
                continue; // corral keeps nothing in the API
            }
            let who = c["name"].as_str().unwrap();
            for (group, resource, verbs) in needs(image) {
                for verb in verbs {
                    assert!(
                        allows(&rules, ns, group, resource, verb),
                        "{name}/{who}: ServiceAccount {sa} may not {verb} {resource} (group {group:?})"
                    );
                }
            }
            if has_flag(c, "--leader-election") {
                for verb in ["get", "create", "update"] {
                    assert!(
                        allows(&rules, ns, "coordination.k8s.io", "leases", verb),
                        "{name}/{who} elects a leader but {sa} may not {verb} leases in {ns}"
                    );
                }
            }
        }
    }
    // No binding names an account that does not exist.
    for binding in objects()
        .iter()
        .filter(|o| matches!(kind_of(o), "RoleBinding" | "ClusterRoleBinding"))
    {
        for s in binding["subjects"].as_array().into_iter().flatten() {
            assert_eq!(s["kind"], "ServiceAccount", "{}", name_of(binding));
            let sa = object("ServiceAccount", s["name"].as_str().unwrap());
            assert_eq!(
                sa["metadata"]["namespace"],
                s["namespace"],
                "{}",
                name_of(binding)
            );
        }
    }
}

#[test]
fn the_node_plugin_mounts_the_kubelet_dirs_with_bidirectional_propagation() {
    let plugin = plugin(node());
    for dir in ["/var/lib/kubelet/pods", "/var/lib/kubelet/plugins"] {
        // The mount covering `dir`: at it or at a parent, and on the host
        // at the same path (the kubelet passes host paths).
        let mounts = plugin["volumeMounts"].as_array().unwrap();
        let mount = mounts
            .iter()
            .filter(|m| {
                let at = m["mountPath"].as_str().unwrap().trim_end_matches('/');
                dir == at || dir.starts_with(&format!("{at}/"))
            })
            .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
            .unwrap_or_else(|| panic!("corral-csi does not mount {dir}"));
        assert_eq!(mount["mountPropagation"], "Bidirectional", "{dir}: {mount}");
        let volume = pod_volume(node(), mount["name"].as_str().unwrap());
        assert_eq!(
            volume["hostPath"]["path"]
                .as_str()
                .map(|p| p.trim_end_matches('/')),
            mount["mountPath"].as_str().map(|p| p.trim_end_matches('/')),
            "{dir}: mounted at a different path than on the host"
        );
    }
    // Bidirectional propagation is refused in unprivileged containers.
    for workload in [controller(), node()] {
        for c in containers(workload) {
            let bidirectional = c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["mountPropagation"] == "Bidirectional");
            if bidirectional {
                assert_eq!(c["securityContext"]["privileged"], true, "{}", c["name"]);
            }
        }
    }
}

#[test]
fn the_node_containers_are_privileged_on_the_host_network() {
    let node = node();
    for name in ["corral-node", "corral-csi"] {
        assert_eq!(
            container(node, name)["securityContext"]["privileged"],
            true,
            "{name} must be privileged"
        );
    }
    let spec = pod_spec(node);
    assert_eq!(spec["hostNetwork"], true);
    // On the host network a pod resolves cluster names only with this.
    assert_eq!(spec["dnsPolicy"], "ClusterFirstWithHostNet");
    let plugin = plugin(node);
    for dir in ["/dev", "/sys", "/lib/modules", "/var/lib/corral"] {
        let mount = volume_at(plugin, dir).unwrap_or_else(|| panic!("corral-csi lacks {dir}"));
        let volume = pod_volume(node, mount["name"].as_str().unwrap());
        assert_eq!(volume["hostPath"]["path"], dir, "{dir} comes from the host");
    }
    // The daemon's data dir is the same host directory.
    let daemon = container(node, "corral-node");
    let data = flag(daemon, "--data-dir").unwrap();
    let mount = volume_at(daemon, data).expect("corral-node mounts its data dir");
    assert_eq!(
        pod_volume(node, mount["name"].as_str().unwrap())["hostPath"]["path"],
        data
    );
}

#[test]
fn ports_on_the_host_network_do_not_collide() {
    // Every listener of the node pod is a listener on the host: none may
    // share a port, nor fall in the engines' frontend range.
    let node = node();
    let port_of = |addr: &str| -> u16 { addr.rsplit(':').next().unwrap().parse().unwrap() };
    let mut listeners = BTreeMap::new();
    for c in containers(node) {
        let who = c["name"].as_str().unwrap();
        for (flag_name, default) in [
            ("--listen", None),
            ("--http-endpoint", None),
            ("--health-port", Some("9808")),
        ] {
            let value = flag(c, flag_name).or(
                if c["image"].as_str().unwrap().contains("/livenessprobe:") {
                    default
                } else {
                    None
                },
            );
            let Some(value) = value else { continue };
            let port = port_of(value);
            assert!(
                !(10000..=10999).contains(&port),
                "{who} {flag_name}: port {port} is in the engines' range"
            );
            if let Some(first) = listeners.insert(port, format!("{who} {flag_name}")) {
                panic!("port {port} is taken by both {first} and {who} {flag_name}");
            }
        }
    }
    assert!(listeners.len() >= 3, "{listeners:?}");
    // Declared container ports name those listeners, each once.
    let mut declared = BTreeSet::new();
    for c in containers(node) {
        for p in c["ports"].as_array().into_iter().flatten() {
            let port = p["containerPort"].as_u64().unwrap() as u16;
            assert!(declared.insert(port), "port {port} declared twice");
            assert!(
                listeners.contains_key(&port),
                "port {port} has no listener: {listeners:?}"
            );
        }
    }
}

#[test]
fn liveness_probes_reach_the_livenessprobe_sidecar() {
    for workload in [controller(), node()] {
        let name = name_of(workload);
        let probe_sidecar = containers(workload)
            .into_iter()
            .find(|c| c["image"].as_str().unwrap().contains("/livenessprobe:"))
            .unwrap_or_else(|| panic!("{name} has no livenessprobe sidecar"));
        let port: u64 = flag(probe_sidecar, "--health-port")
            .unwrap_or("9808")
            .parse()
            .unwrap();
        let plugin = plugin(workload);
        let target = &plugin["livenessProbe"]["httpGet"];
        assert_eq!(target["path"], "/healthz", "{name}");
        let resolved = match &target["port"] {
            Value::Number(n) => n.as_u64().unwrap(),
            Value::String(named) => plugin["ports"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == *named))
                .and_then(|p| p["containerPort"].as_u64())
                .unwrap_or_else(|| panic!("{name}: no port named {named}")),
            other => panic!("{name}: probe port {other}"),
        };
        assert_eq!(
            resolved, port,
            "{name}: the probe misses the sidecar's port"
        );
    }
}

#[test]
fn the_headless_service_finds_every_node_daemon() {
    let service = object("Service", "corral-node");
    assert_eq!(service["spec"]["clusterIP"], "None", "must be headless");
    let selector = service["spec"]["selector"].as_object().expect("a selector");
    assert!(!selector.is_empty());
    let labels = &node()["spec"]["template"]["metadata"]["labels"];
    for (k, v) in selector {
        assert_eq!(&labels[k], v, "the DaemonSet's pods lack label {k}={v}");
    }
    let ports = service["spec"]["ports"].as_array().unwrap();
    let grpc = ports
        .iter()
        .find(|p| p["port"] == 9600)
        .expect("the Service exposes 9600");
    // Its target is the daemon's listening port.
    let daemon = container(node(), "corral-node");
    let listen = flag(daemon, "--listen").unwrap();
    assert!(listen.ends_with(":9600"), "{listen}");
    let target = &grpc["targetPort"];
    let target_port = match target {
        Value::Null => 9600,
        Value::Number(n) => n.as_u64().unwrap(),
        Value::String(named) => daemon["ports"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == *named))
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("corral-node has no port named {named}")),
        other => panic!("targetPort {other}"),
    };
    assert_eq!(target_port, 9600);
    // The controller asks for exactly this Service by its cluster DNS name.
    let daemons = flag(plugin(controller()), "--daemons").unwrap();
    assert_eq!(
        daemons,
        format!("{}.{}.svc.cluster.local:9600", name_of(service), NAMESPACE)
    );
}

#[test]
fn the_storage_class_parameters_are_exactly_the_issue_s() {
    let class = object("StorageClass", "fast");
    assert_eq!(class["provisioner"], DRIVER);
    assert_eq!(class["allowVolumeExpansion"], true);
    assert_eq!(class["volumeBindingMode"], "WaitForFirstConsumer");
    assert_eq!(
        class["parameters"],
        serde_json::json!({
            "numberOfReplicas": "3",
            "staleReplicaTimeout": "30",
            "fsType": "ext4",
            "dataLocality": "best-effort",
        })
    );
}

/// A container's args without its `--tls-* VALUE` pairs (checked on their
/// own by `every_corral_process_runs_mutual_tls_from_the_cluster_secret`).
fn args_without_tls(c: &Value) -> Vec<&str> {
    let all = args(c);
    let mut kept = Vec::new();
    let mut i = 0;
    while i < all.len() {
        if all[i].starts_with("--tls-") {
            i += if all[i].contains('=') { 1 } else { 2 };
            continue;
        }
        kept.push(all[i]);
        i += 1;
    }
    kept
}

#[test]
fn the_commands_follow_the_command_line_contract() {
    let node = node();
    assert_eq!(
        args_without_tls(container(node, "corral-node")),
        [
            "node",
            "--listen",
            "0.0.0.0:9600",
            "--data-dir",
            "/var/lib/corral",
            "--node-id",
            "$(NODE_NAME)",
            "--engine-ports",
            "10000-10999",
            "--frontend-address",
            "127.0.0.1",
            "--replica-address",
            "$(NODE_IP):9600",
        ]
    );
    assert_eq!(
        args_without_tls(plugin(node)),
        [
            "csi",
            "--endpoint",
            "unix:///csi/csi.sock",
            "--node-id",
            "$(NODE_NAME)",
            "--node",
            "--attach",
            "iscsi",
            "--state-dir",
            "/var/lib/corral/csi",
        ]
    );
    assert_eq!(
        args_without_tls(plugin(controller())),
        [
            "csi",
            "--endpoint",
            "unix:///csi/csi.sock",
            "--node-id",
            "controller",
            "--controller",
            "--daemons",
            "corral-node.corral-system.svc.cluster.local:9600",
        ]
    );
    let provisioner = container(controller(), "csi-provisioner");
    assert_eq!(flag(provisioner, "--feature-gates"), Some("Topology=true"));
    assert!(has_flag(provisioner, "--extra-create-metadata"));
}

#[test]
fn every_variable_an_argument_uses_is_defined() {
    // Kubernetes expands $(NAME) in args only when the container defines
    // NAME; otherwise the literal text is passed (a node id "$(NODE_NAME)").
    for workload in [controller(), node()] {
        for c in containers(workload) {
            let env: BTreeSet<&str> = c["env"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["name"].as_str())
                .collect();
            for a in args(c) {
                let mut rest = a;
                while let Some(start) = rest.find("$(") {
                    let tail = &rest[start + 2..];
                    let end = tail.find(')').expect("unclosed $(");
                    let var = &tail[..end];
                    assert!(
                        env.contains(var),
                        "{}/{}: $({var}) is not defined",
                        name_of(workload),
                        c["name"]
                    );
                    rest = &tail[end..];
                }
            }
        }
    }
    // NODE_NAME is the node's name, so the node id is the Kubernetes node.
    for c in [container(node(), "corral-node"), plugin(node())] {
        assert_eq!(env_field(c, "NODE_NAME"), "spec.nodeName");
    }
}

/// Where a container's environment variable comes from (a fieldRef path).
fn env_field<'a>(c: &'a Value, name: &str) -> &'a Value {
    let env = c["env"].as_array().expect("an env list");
    let var = env
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("{} does not define {name}", c["name"]));
    &var["valueFrom"]["fieldRef"]["fieldPath"]
}

#[test]
fn the_node_daemon_advertises_an_address_other_nodes_can_reach() {
    // Engines on other nodes dial the replica address a daemon reports.
    // With a wildcard --listen and no --replica-address it would report
    // --frontend-address (127.0.0.1): unreachable from anywhere else.
    let daemon = container(node(), "corral-node");
    let listen = flag(daemon, "--listen").unwrap();
    let advertised = flag(daemon, "--replica-address")
        .expect("--replica-address is needed beside a wildcard --listen");
    let (host, port) = advertised.rsplit_once(':').unwrap();
    assert_eq!(
        Some(port),
        listen.rsplit_once(':').map(|(_, p)| p),
        "the listening port"
    );
    let var = host
        .strip_prefix("$(")
        .and_then(|h| h.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{host}: expected the node's IP from the downward API"));
    let field = env_field(daemon, var);
    assert!(
        field == "status.podIP" || field == "status.hostIP",
        "{var} comes from {field}"
    );
    // The pod's IP is the node's only on the host network.
    assert_eq!(pod_spec(node())["hostNetwork"], true);
}

#[test]
fn images_are_pinned_and_overridable() {
    let kustomization = parse_yaml(&repo().join("deploy/kustomization.yaml"))
        .unwrap()
        .remove(0);
    let images = kustomization["images"]
        .as_array()
        .expect("kustomize images:");
    assert!(
        images
            .iter()
            .any(|i| i["name"] == "ghcr.io/corral-io/corral" && i["newTag"] == "0.1.0"),
        "the corral image is set through kustomize images: {images:?}"
    );
    for workload in [controller(), node()] {
        for c in containers(workload) {
            let image = c["image"].as_str().unwrap();
            let (repo_part, tag) = image.rsplit_once(':').expect("a tagged image");
            assert!(!tag.is_empty() && tag != "latest", "{image} is not pinned");
            assert!(
                repo_part == "ghcr.io/corral-io/corral"
                    || repo_part.starts_with("registry.k8s.io/sig-storage/"),
                "{image}: unexpected registry"
            );
            if repo_part.starts_with("registry.k8s.io/") {
                assert!(tag.starts_with('v'), "{image}");
            }
        }
    }
}

#[test]
fn the_mysql_example_is_a_replicated_stateful_set_on_corral() {
    let docs = parse_yaml(&repo().join("deploy/examples/mysql.yaml")).unwrap();
    let set = docs
        .iter()
        .find(|d| kind_of(d) == "StatefulSet")
        .expect("a StatefulSet");
    let service_name = set["spec"]["serviceName"].as_str().unwrap();
    let headless = docs
        .iter()
        .find(|d| kind_of(d) == "Service" && name_of(d) == service_name)
        .expect("the StatefulSet's governing Service");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert!(
        docs.iter()
            .any(|d| kind_of(d) == "Service" && d["spec"]["clusterIP"] != "None"),
        "a read Service"
    );
    assert!(docs.iter().any(|d| kind_of(d) == "ConfigMap"));
    assert!(set["spec"]["replicas"].as_u64().unwrap() >= 2);
    let init = pod_spec(set)["initContainers"].as_array().unwrap();
    assert!(init.len() >= 2, "config and clone init containers");
    let scripts: String = containers(set)
        .iter()
        .map(|c| c["command"].to_string())
        .collect();
    assert!(scripts.contains("xtrabackup --prepare"));
    assert!(scripts.contains("xbstream"));
    for template in set["spec"]["volumeClaimTemplates"].as_array().unwrap() {
        assert_eq!(template["spec"]["storageClassName"], "fast");
    }
}

#[test]
fn every_corral_process_runs_mutual_tls_from_the_cluster_secret() {
    // The node daemon (and the engines it starts, which inherit its
    // flags), the node plugin and the controller plugin: each mounts the
    // corral-tls Secret and names its three files, and all agree on the
    // name every server's certificate carries.
    let workloads = [
        (node(), "corral-node"),
        (node(), "corral-csi"),
        (controller(), "corral-csi"),
    ];
    let mut names = BTreeSet::new();
    for (workload, name) in workloads {
        let c = container(workload, name);
        let mount = volume_at(c, "/etc/corral/tls")
            .unwrap_or_else(|| panic!("{name} does not mount the TLS Secret"));
        assert_eq!(mount["readOnly"], true, "{name}");
        let volume = pod_volume(workload, mount["name"].as_str().unwrap());
        assert_eq!(volume["secret"]["secretName"], "corral-tls", "{name}");
        for (flag_name, file) in [
            ("--tls-cert", "tls.crt"),
            ("--tls-key", "tls.key"),
            ("--tls-ca", "ca.crt"),
        ] {
            assert_eq!(
                flag(c, flag_name),
                Some(format!("/etc/corral/tls/{file}").as_str()),
                "{name} {flag_name}"
            );
        }
        names.insert(flag(c, "--tls-server-name").unwrap_or("(none)"));
    }
    assert_eq!(names.len(), 1, "one server name for the cluster: {names:?}");
    // The name is the headless Service's, which --daemons dials.
    let daemons = flag(plugin(controller()), "--daemons").unwrap();
    let name = names.into_iter().next().unwrap();
    assert!(daemons.starts_with(name), "{daemons} vs {name}");
}
