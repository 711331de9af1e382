//! `--config FILE`: a TOML file whose keys are the long flag names of the subcommand run (`tls-ca =
//! "/etc/walship/ca.crt"`, `window-mb = 64`; `_` works for `-`). Its values become the flags' defaults, so
//! the precedence is: flags, then the environment (`WALSHIP_*`), then the file, then the built-in defaults.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::error::ErrorKind;

/// Parses the process's command line as [`parse_from`] does; prints the error and exits on failure.
pub fn parse<P: clap::Parser>() -> P {
    let config = std::env::var_os("WALSHIP_CONFIG").filter(|v| !v.is_empty());
    parse_from(std::env::args_os().collect(), config).unwrap_or_else(|e| e.exit())
}

/// Parses `args` (with the program name first) for `P`, reading the TOML file of `--config FILE` (or of
/// `env_config`, `WALSHIP_CONFIG`) into the defaults of the subcommand's flags. A key no subcommand knows
/// is an error naming the file and the key (a typo must not be ignored); keys of other subcommands are
/// left alone, so that `run` and `check` share one file.
pub fn parse_from<P: clap::Parser>(
    args: Vec<OsString>,
    env_config: Option<OsString>,
) -> Result<P, clap::Error> {
    let mut cmd = P::command();
    let file = config_flag(&args).or(env_config.map(PathBuf::from));
    let sub = args
        .iter()
        .skip(1)
        .find(|a| !a.to_string_lossy().starts_with('-'))
        .map(|a| a.to_string_lossy().into_owned());
    if let (Some(path), Some(sub)) = (file, sub) {
        if cmd.find_subcommand(&sub).is_some() {
            let defaults = file_defaults(&cmd, &sub, &path)?;
            cmd = cmd.mut_subcommand(&sub, |mut sc| {
                for (id, values) in defaults {
                    sc = sc.mut_arg(id, |a| a.default_values(values).required(false));
                }
                sc
            });
        }
    }
    let matches = cmd.try_get_matches_from_mut(args)?;
    P::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))
}

/// The defaults the config file at `path` gives the flags of subcommand `sub`.
fn file_defaults(
    cmd: &clap::Command,
    sub: &str,
    path: &std::path::Path,
) -> Result<Vec<(clap::Id, Vec<String>)>, clap::Error> {
    let mut cmd = cmd.clone();
    let text = std::fs::read_to_string(path).map_err(|e| {
        cmd.error(
            ErrorKind::Io,
            format!("cannot read the config file {}: {e}", path.display()),
        )
    })?;
    let table: toml::Table = text.parse().map_err(|e| {
        cmd.error(
            ErrorKind::InvalidValue,
            format!("the config file {} is not valid TOML: {e}", path.display()),
        )
    })?;
    let known: Vec<String> = cmd
        .get_subcommands()
        .flat_map(|s| s.get_arguments())
        .filter_map(|a| a.get_long().map(str::to_owned))
        .collect();
    let target = cmd
        .find_subcommand(sub)
        .expect("checked by the caller")
        .clone();
    let mut defaults = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        if long == "config" {
            continue;
        }
        if !known.contains(&long) {
            return Err(cmd.error(
                ErrorKind::UnknownArgument,
                format!(
                    "unknown key {key:?} in the config file {}: the keys are the long flags (see --help)",
                    path.display()
                ),
            ));
        }
        let Some(arg) = target.get_arguments().find(|a| a.get_long() == Some(&long)) else {
            continue; // a key of another subcommand: the file is shared
        };
        let Some(values) = flag_values(value) else {
            return Err(cmd.error(
                ErrorKind::InvalidValue,
                format!(
                    "key {key:?} in the config file {} has a {} value: give a string, number, boolean or list",
                    path.display(),
                    value.type_str()
                ),
            ));
        };
        defaults.push((arg.get_id().clone(), values));
    }
    Ok(defaults)
}

/// A TOML value as the flag's values; `None` for a table or date.
fn flag_values(value: &toml::Value) -> Option<Vec<String>> {
    Some(match value {
        toml::Value::String(s) => vec![s.clone()],
        toml::Value::Integer(i) => vec![i.to_string()],
        toml::Value::Float(f) => vec![f.to_string()],
        toml::Value::Boolean(b) => vec![b.to_string()],
        toml::Value::Array(items) => items
            .iter()
            .map(|v| match v {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        _ => return None,
    })
}

/// The value of `--config FILE` or `--config=FILE`.
fn config_flag(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().map(|a| a.to_string_lossy());
    while let Some(a) = it.next() {
        if a == "--" {
            return None;
        }
        if a == "--config" {
            return it.next().map(|v| PathBuf::from(v.into_owned()));
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Parser, Subcommand};

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(Subcommand, Debug)]
    enum Cmd {
        Run(Args),
        Other {
            #[arg(long)]
            elsewhere: Option<String>,
        },
    }

    #[derive(Parser, Debug)]
    struct Args {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, env = "WALSHIP_TEST_CONFIG_RECEIVER")]
        receiver: String,
        #[arg(long, default_value_t = 64)]
        window_mb: u64,
        #[arg(long)]
        force: bool,
        #[arg(long, value_delimiter = ',')]
        name: Vec<String>,
    }

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        let args = args.iter().map(OsString::from).collect();
        parse_from::<Cli>(args, None).map(|c| match c.cmd {
            Cmd::Run(a) => a,
            Cmd::Other { .. } => panic!("other"),
        })
    }

    #[test]
    fn the_file_gives_defaults_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.toml");
        std::fs::write(
            &file,
            "# comment\nreceiver = \"standby:7433\"\nwindow_mb = 8\nforce = true\nname = [\"a\", \"b\"]\nelsewhere = \"x\"\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let a = parse(&["w", "run", "--config", f]).unwrap();
        assert_eq!(a.receiver, "standby:7433");
        assert_eq!(a.window_mb, 8);
        assert!(a.force);
        assert_eq!(a.name, ["a", "b"]);
        let a = parse(&["w", "run", &format!("--config={f}"), "--window-mb", "2"]).unwrap();
        assert_eq!(a.window_mb, 2);
        // without the file, the built-in default and a missing required flag
        assert!(parse(&["w", "run", "--receiver", "r:1"]).unwrap().window_mb == 64);
        assert!(parse(&["w", "run"]).is_err());
    }

    #[test]
    fn a_key_no_subcommand_knows_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.toml");
        std::fs::write(&file, "receiver = \"r:1\"\nwindow-mbb = 8\n").unwrap();
        let e = parse(&["w", "run", "--config", file.to_str().unwrap()]).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("window-mbb") && text.contains("w.toml"),
            "{text}"
        );
        std::fs::write(&file, "receiver = \n").unwrap();
        let e = parse(&["w", "run", "--config", file.to_str().unwrap()]).unwrap_err();
        assert!(e.to_string().contains("not valid TOML"), "{e}");
        let e = parse(&["w", "run", "--config", "/nonexistent.toml"]).unwrap_err();
        assert!(e.to_string().contains("/nonexistent.toml"), "{e}");
    }
}
