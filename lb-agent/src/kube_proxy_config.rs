//! kube-proxy's own configuration file (`KubeProxyConfiguration`, what kube-proxy's `--config`
//! reads; kubeadm keeps it in the `kube-proxy` ConfigMap), read as the agent's flags
//! (`--kube-proxy-config`), so a cluster moving from kube-proxy keeps the settings it chose.
//! Each field with an equivalent becomes that flag, placed before the command line's flags: a
//! flag given there as well wins (a flag given twice takes its last value). Fields without one
//! (the proxy mode, iptables/IPVS/nftables tuning, the cluster CIDR) are named as not used.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result, bail};
use serde_yaml_ng::{Mapping, Value};

/// The flag that names the file.
pub const FLAG: &str = "--kube-proxy-config";

/// What the file said, as flags, and what of it has no use here.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Translated {
    /// `--flag value` pairs, in the file's order.
    pub flags: Vec<(String, String)>,
    /// Fields read but not used, each with why.
    pub unused: Vec<String>,
}

/// Translates a `KubeProxyConfiguration` document; `cpus` sizes conntrack as kube-proxy does
/// (`maxPerCore` per CPU, at least `min`).
pub fn translate(text: &str, cpus: u32) -> Result<Translated> {
    let doc: Value = serde_yaml_ng::from_str(text).context("not YAML")?;
    let Value::Mapping(map) = doc else { bail!("not a YAML mapping") };
    let kind = str_field(&map, "kind")?.unwrap_or_default();
    let api = str_field(&map, "apiVersion")?.unwrap_or_default();
    if kind != "KubeProxyConfiguration" || !api.starts_with("kubeproxy.config.k8s.io/") {
        bail!(
            "kind {kind:?}, apiVersion {api:?}: not a KubeProxyConfiguration (kubeproxy.config.k8s.io)"
        );
    }
    let mut out = Translated::default();
    for (key, value) in &map {
        let key = key.as_str().context("a field name that is not a string")?;
        match key {
            "apiVersion" | "kind" => {}
            "hostnameOverride" => out.flag("--node-name", str_value(key, value)?),
            "healthzBindAddress" => {
                let addr = str_value(key, value)?.map(|a| bind_address(key, &a, 10256));
                out.flag("--health-bind-address", addr.transpose()?);
            }
            "metricsBindAddress" => {
                let addr = str_value(key, value)?.map(|a| bind_address(key, &a, 10249));
                out.flag("--metrics-bind-address", addr.transpose()?);
            }
            "nodePortAddresses" => out.flag("--nodeport-addresses", list_value(key, value)?),
            "clientConnection" => {
                for (sub, v) in mapping(key, value)? {
                    let sub = sub.as_str().unwrap_or_default();
                    if sub == "kubeconfig" {
                        out.flag("--kubeconfig", str_value("clientConnection.kubeconfig", v)?);
                    } else {
                        out.unused.push(format!("clientConnection.{sub}: not used"));
                    }
                }
            }
            "conntrack" => out.conntrack(mapping(key, value)?, cpus)?,
            "mode" => out.unused.push(format!(
                "mode {}: this agent replaces every kube-proxy mode",
                str_value(key, value)?.unwrap_or_else(|| "(default)".into())
            )),
            other => out.unused.push(format!("{other}: not used by this agent")),
        }
    }
    Ok(out)
}

impl Translated {
    fn flag(&mut self, flag: &str, value: Option<String>) {
        if let Some(v) = value {
            self.flags.push((flag.to_owned(), v));
        }
    }

    /// `conntrack`: the lifetimes (Go durations, 0 meaning "leave as is", as kube-proxy
    /// takes it) and the table's size. kube-proxy sizes netfilter's table, one entry a flow:
    /// this agent's holds two a flow, so it gets twice as many.
    fn conntrack(&mut self, ct: &Mapping, cpus: u32) -> Result<()> {
        let mut per_core: Option<u64> = None;
        let mut min: Option<u64> = None;
        for (sub, v) in ct {
            let sub = sub.as_str().unwrap_or_default();
            let name = format!("conntrack.{sub}");
            let flag = match sub {
                "tcpEstablishedTimeout" => "--conntrack-tcp-timeout-established",
                "tcpCloseWaitTimeout" => "--conntrack-tcp-timeout-close-wait",
                "udpTimeout" => "--conntrack-udp-timeout",
                "udpStreamTimeout" => "--conntrack-udp-timeout-stream",
                "maxPerCore" => {
                    per_core = int_value(&name, v)?;
                    continue;
                }
                "min" => {
                    min = int_value(&name, v)?;
                    continue;
                }
                _ => {
                    self.unused.push(format!("{name}: not used"));
                    continue;
                }
            };
            let d = str_value(&name, v)?.filter(|d| !is_zero_duration(d));
            self.flag(flag, d);
        }
        if let Some(per_core) = per_core.filter(|n| *n > 0) {
            let flows = (per_core * u64::from(cpus)).max(min.unwrap_or(0));
            let entries = (2 * flows).min(u64::from(u32::MAX));
            self.flag("--max-conntrack", Some(entries.to_string()));
        }
        Ok(())
    }
}

fn str_field(map: &Mapping, key: &str) -> Result<Option<String>> {
    map.get(key).map_or(Ok(None), |v| str_value(key, v))
}

/// A string field; empty or null as absent.
fn str_value(name: &str, v: &Value) -> Result<Option<String>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        other => bail!("{name}: a string was expected, not {}", type_name(other)),
    }
}

/// A list of strings, joined by commas; empty or null as absent.
fn list_value(name: &str, v: &Value) -> Result<Option<String>> {
    let items = match v {
        Value::Null => return Ok(None),
        Value::Sequence(items) => items,
        other => bail!("{name}: a list was expected, not {}", type_name(other)),
    };
    let mut out = Vec::new();
    for item in items {
        match item {
            Value::String(s) if s.contains(',') => bail!("{name}: {s:?} is not one entry"),
            Value::String(s) => out.push(s.clone()),
            other => bail!("{name}: strings were expected, not {}", type_name(other)),
        }
    }
    Ok((!out.is_empty()).then(|| out.join(",")))
}

fn int_value(name: &str, v: &Value) -> Result<Option<u64>> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => {
            n.as_u64().map(Some).with_context(|| format!("{name}: {n} is no count"))
        }
        other => bail!("{name}: a number was expected, not {}", type_name(other)),
    }
}

fn mapping<'a>(name: &str, v: &'a Value) -> Result<&'a Mapping> {
    static EMPTY: std::sync::LazyLock<Mapping> = std::sync::LazyLock::new(Mapping::new);
    match v {
        Value::Mapping(m) => Ok(m),
        Value::Null => Ok(&EMPTY),
        other => bail!("{name}: a mapping was expected, not {}", type_name(other)),
    }
}

/// kube-proxy's bind addresses: `ip:port`, or an IP alone (its default port).
fn bind_address(name: &str, s: &str, default_port: u16) -> Result<String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr.to_string());
    }
    let ip: IpAddr = s.parse().with_context(|| format!("{name}: {s:?} is no address"))?;
    Ok(SocketAddr::new(ip, default_port).to_string())
}

/// "0s", "0", "0h0m0s": kube-proxy then leaves the kernel's value.
fn is_zero_duration(d: &str) -> bool {
    d.chars().all(|c| c == '0' || c.is_ascii_alphabetic())
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// The file `--kube-proxy-config` named (its path) and its translation.
pub type FileRead = (String, Translated);

/// The command line with the flags of the file `--kube-proxy-config` names (if any) placed
/// first, and that file's translation.
pub fn expand(
    argv: Vec<std::ffi::OsString>,
    cpus: u32,
) -> Result<(Vec<std::ffi::OsString>, Option<FileRead>)> {
    let mut path = None;
    let mut i = 1;
    while i < argv.len() {
        let arg = argv[i].to_string_lossy();
        if arg == FLAG {
            path = argv.get(i + 1).map(|p| p.to_string_lossy().into_owned());
            i += 2;
        } else {
            if let Some(p) = arg.strip_prefix(&format!("{FLAG}=")) {
                path = Some(p.to_owned());
            }
            i += 1;
        }
    }
    let Some(path) = path else { return Ok((argv, None)) };
    let text = std::fs::read_to_string(&path).with_context(|| format!("{FLAG} {path}"))?;
    let mut t = translate(&text, cpus).with_context(|| format!("{FLAG} {path}"))?;
    // A manifests folder has no API server to reach (and the flags conflict).
    let manifests = argv.iter().any(|a| {
        let a = a.to_string_lossy();
        a == "--manifests" || a.starts_with("--manifests=")
    });
    if manifests && t.flags.iter().any(|(f, _)| f == "--kubeconfig") {
        t.flags.retain(|(f, _)| f != "--kubeconfig");
        t.unused.push("clientConnection.kubeconfig: not used with --manifests".into());
    }
    let mut out = vec![argv[0].clone()];
    for (flag, value) in &t.flags {
        out.push(format!("{flag}={value}").into());
    }
    out.extend(argv.into_iter().skip(1));
    Ok((out, Some((path, t))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What kubeadm writes into the kube-proxy ConfigMap (v1.31), with a few values set.
    const KUBEADM: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: \"\"
  burst: 0
  contentType: \"\"
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: 24h0m0s
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocalMode: \"\"
enableProfiling: false
healthzBindAddress: \"\"
hostnameOverride: \"\"
iptables:
  masqueradeAll: false
kind: KubeProxyConfiguration
metricsBindAddress: 0.0.0.0
mode: ipvs
nodePortAddresses: [primary]
oomScoreAdj: null
";

    fn flags(t: &Translated) -> Vec<(&str, &str)> {
        t.flags.iter().map(|(f, v)| (f.as_str(), v.as_str())).collect()
    }

    #[test]
    fn kubeadms_file_becomes_the_flags_it_has_values_for() {
        let t = translate(KUBEADM, 4).unwrap();
        assert_eq!(
            flags(&t),
            [
                ("--kubeconfig", "/var/lib/kube-proxy/kubeconfig.conf"),
                ("--conntrack-tcp-timeout-established", "24h0m0s"),
                ("--metrics-bind-address", "0.0.0.0:10249"),
                ("--nodeport-addresses", "primary"),
            ]
        );
        for unused in
            ["bindAddress", "clusterCIDR", "iptables", "mode ipvs", "conntrack.tcpBeLiberal"]
        {
            assert!(t.unused.iter().any(|u| u.starts_with(unused)), "{unused}: {:?}", t.unused);
        }
    }

    #[test]
    fn conntrack_is_sized_per_cpu_for_two_entries_a_flow() {
        let yaml = "kind: KubeProxyConfiguration\napiVersion: kubeproxy.config.k8s.io/v1alpha1\nconntrack: {maxPerCore: 32768, min: 131072, udpTimeout: 30s, tcpCloseWaitTimeout: 1h0m0s}\nhealthzBindAddress: 0.0.0.0:10256\nnodePortAddresses: [10.0.0.0/8, \"fd00::/64\"]\n";
        let small = translate(yaml, 2).unwrap();
        assert_eq!(
            flags(&small),
            [
                ("--conntrack-udp-timeout", "30s"),
                ("--conntrack-tcp-timeout-close-wait", "1h0m0s"),
                ("--max-conntrack", "262144"),
                ("--health-bind-address", "0.0.0.0:10256"),
                ("--nodeport-addresses", "10.0.0.0/8,fd00::/64"),
            ]
        );
        let big = translate(yaml, 16).unwrap();
        assert!(big.flags.contains(&("--max-conntrack".into(), "1048576".into())));
        // maxPerCore 0: kube-proxy leaves the table as it is; so does this.
        let zero = yaml.replace("maxPerCore: 32768", "maxPerCore: 0");
        assert!(!translate(&zero, 2).unwrap().flags.iter().any(|(f, _)| f == "--max-conntrack"));
    }

    #[test]
    fn other_documents_and_wrong_types_are_refused_naming_the_field() {
        let head = "kind: KubeProxyConfiguration\napiVersion: kubeproxy.config.k8s.io/v1alpha1\n";
        for (yaml, said) in [
            ("kind: Service\napiVersion: v1\n", "not a KubeProxyConfiguration"),
            ("- a\n- b\n", "not a YAML mapping"),
            ("{unclosed", "not YAML"),
            (&format!("{head}nodePortAddresses: 10.0.0.0/8\n"), "nodePortAddresses: a list"),
            (&format!("{head}nodePortAddresses: [\"10.0.0.0/8,1.2.3.0/24\"]\n"), "not one entry"),
            (&format!("{head}conntrack: {{maxPerCore: -1}}\n"), "conntrack.maxPerCore"),
            (&format!("{head}conntrack: [1]\n"), "conntrack: a mapping"),
            (&format!("{head}metricsBindAddress: somewhere\n"), "metricsBindAddress"),
            (&format!("{head}hostnameOverride: [a]\n"), "hostnameOverride: a string"),
        ] {
            let e = format!("{:#}", translate(yaml, 2).unwrap_err());
            assert!(e.contains(said), "{yaml:?}: {e}");
        }
    }

    #[test]
    fn the_files_flags_come_first_so_the_command_lines_win() {
        let dir = std::env::temp_dir().join(format!("kpc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.conf");
        std::fs::write(&file, KUBEADM).unwrap();
        let argv: Vec<std::ffi::OsString> =
            ["lb-agent", "--metrics-bind-address", "127.0.0.1:9", FLAG]
                .iter()
                .map(Into::into)
                .chain([file.clone().into_os_string()])
                .collect();
        let (out, t) = expand(argv, 1).unwrap();
        let out: Vec<String> = out.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(out[0], "lb-agent");
        assert_eq!(out[3], "--metrics-bind-address=0.0.0.0:10249");
        assert_eq!(&out[5..7], ["--metrics-bind-address", "127.0.0.1:9"]);
        assert_eq!(t.unwrap().0, file.to_string_lossy());
        // With a manifests folder, the file's kubeconfig is left out (no API server).
        let argv: Vec<std::ffi::OsString> = vec![
            "lb-agent".into(),
            "--manifests=/m".into(),
            format!("{FLAG}={}", file.display()).into(),
        ];
        let (out, t) = expand(argv, 1).unwrap();
        assert!(!out.iter().any(|a| a.to_string_lossy().starts_with("--kubeconfig")), "{out:?}");
        assert!(t.unwrap().1.unused.iter().any(|u| u.contains("not used with --manifests")));
        // No flag: the command line as it was; a missing file: an error naming it.
        let plain: Vec<std::ffi::OsString> = vec!["lb-agent".into(), "--xdp".into()];
        assert_eq!(expand(plain.clone(), 1).unwrap(), (plain, None));
        let missing = vec!["lb-agent".into(), format!("{FLAG}=/nonexistent/kp.conf").into()];
        let e = format!("{:#}", expand(missing, 1).unwrap_err());
        assert!(e.contains("/nonexistent/kp.conf"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
