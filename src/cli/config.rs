//! `add --config FILE`: a TOML file whose keys are `add`'s long flags
//! (`bucket = "s3://…"`, `key-file = "/etc/…"`, `queues = 2`,
//! `create = true`). It is turned into flags placed before the command
//! line's own, so the file and the flags mean exactly the same, and flags
//! given on the command line win (clap keeps the last value).

use anyhow::{Context, Result, bail};

pub fn expand(args: Vec<String>) -> Result<Vec<String>> {
    let Some(pos) = args
        .iter()
        .position(|a| a == "--config" || a.starts_with("--config="))
    else {
        return Ok(args);
    };
    if args.get(1).map(String::as_str) != Some("add") {
        bail!("--config is only accepted by `add`");
    }
    let (path, consumed) = match args[pos].strip_prefix("--config=") {
        Some(p) => (p.to_string(), 1),
        None => (
            args.get(pos + 1)
                .cloned()
                .context("--config needs a file")?,
            2,
        ),
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("cannot read config {path}"))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("invalid TOML in {path}"))?;
    // A flag the command line gives wins: its key in the file is not used
    // at all (not even expanded: `--key-file` by hand outside systemd
    // overrides a `${CREDENTIALS_DIRECTORY}` path).
    let given = |flag: &str| {
        args[2..]
            .iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
    };
    let mut flags = Vec::new();
    for (key, value) in table {
        let flag = format!("--{}", key.replace('_', "-"));
        if given(&flag) {
            continue;
        }
        match value {
            toml::Value::Boolean(true) => flags.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::String(s) => flags.extend([flag, expand_credentials(&s)?]),
            toml::Value::Integer(i) => flags.extend([flag, i.to_string()]),
            other => bail!("{path}: {key} = {other} is not a string, number or boolean"),
        }
    }
    let mut out: Vec<String> = args[..2].to_vec();
    out.extend(flags);
    out.extend(args[2..pos].iter().cloned());
    out.extend(args[pos + consumed..].iter().cloned());
    Ok(out)
}

/// `${CREDENTIALS_DIRECTORY}` in a value becomes systemd's credentials
/// directory (for `LoadCredential=`), so secrets never sit in the file.
fn expand_credentials(value: &str) -> Result<String> {
    const VAR: &str = "${CREDENTIALS_DIRECTORY}";
    if !value.contains(VAR) {
        return Ok(value.to_string());
    }
    let dir = std::env::var("CREDENTIALS_DIRECTORY")
        .context("config uses ${CREDENTIALS_DIRECTORY} but systemd set none (LoadCredential=)")?;
    Ok(value.replace(VAR, &dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_becomes_flags_and_command_line_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.toml");
        std::fs::write(
            &path,
            "bucket = \"file:///x\"\nqueues = 2\nforeground = true\ncreate = false\n",
        )
        .unwrap();
        let args: Vec<String> = [
            "zerofs-ublk",
            "add",
            "--config",
            path.to_str().unwrap(),
            "--queues",
            "4",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = expand(args).unwrap();
        assert_eq!(out[..2], ["zerofs-ublk", "add"]);
        let rest = out[2..].join(" ");
        assert!(rest.contains("--bucket file:///x"));
        assert!(rest.contains("--foreground"));
        assert!(!rest.contains("--create"));
        assert!(rest.ends_with("--queues 4"), "{rest}");
        assert!(!rest.contains("--queues 2"), "{rest}");
    }

    /// Outside systemd (a takeover by hand, README), `--key-file` on the
    /// command line replaces the file's `${CREDENTIALS_DIRECTORY}` path,
    /// which then is not expanded (there is no such directory).
    #[test]
    fn a_flag_given_by_hand_replaces_a_credentials_path() {
        if std::env::var_os("CREDENTIALS_DIRECTORY").is_some() {
            return; // run under systemd with credentials: nothing to show
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.toml");
        std::fs::write(
            &path,
            "bucket = \"file:///x\"\nkey-file = \"${CREDENTIALS_DIRECTORY}/key\"\n",
        )
        .unwrap();
        let args = |extra: &[&str]| -> Vec<String> {
            ["zerofs-ublk", "add", "--config", path.to_str().unwrap()]
                .iter()
                .chain(extra)
                .map(|s| s.to_string())
                .collect()
        };
        let err = expand(args(&[])).unwrap_err();
        assert!(
            format!("{err:#}").contains("CREDENTIALS_DIRECTORY"),
            "{err:#}"
        );
        let out = expand(args(&["--key-file", "/etc/k"])).unwrap().join(" ");
        assert!(out.ends_with("--key-file /etc/k"), "{out}");
        assert_eq!(out.matches("--key-file").count(), 1, "{out}");
        let out = expand(args(&["--key-file=/etc/k"])).unwrap().join(" ");
        assert_eq!(out.matches("--key-file").count(), 1, "{out}");
    }
}
