//! What the man pages say beyond `--help`: the EXIT STATUS, FILES, SIGNALS, ENVIRONMENT and SEE
//! ALSO sections `generate man` adds to every page, and `dropscan.toml(5)`, rendered from the
//! commented example configuration itself (the file the `.deb` installs as the conffile), so
//! that the page and the file cannot drift apart.
//!
//! The example's layout is the source: a comment block followed by `key = value` lines documents
//! those keys (a commented-out `# key = value` is a key without a default); a comment block
//! followed by a blank line is prose; a commented table (`# [[hook]]`) starts an example that
//! runs to the next line that is not a comment.

/// The example configuration, as shipped.
pub const EXAMPLE_CONFIG: &str = include_str!("../../config/dropscan.example.toml");

/// Escapes text for roff: backslashes, hyphens (so that `--config` is typed as shown), and a
/// control character at the start of a line.
pub fn roff(text: &str) -> String {
    let t = text.replace('\\', "\\e").replace('-', "\\-");
    if t.starts_with('.') || t.starts_with('\'') {
        format!("\\&{t}")
    } else {
        t
    }
}

/// A tagged paragraph: `tag` in bold, `body` below it.
fn tp(out: &mut String, tag: &str, body: &str) {
    out.push_str(&format!(".TP\n\\fB{}\\fR\n{}\n", roff(tag), roff(body)));
}

/// The exit codes (sysexits where one fits); the same on every page.
const EXIT_STATUS: [(&str, &str); 10] = [
    (
        "0",
        "Success; `scan`: every file clean; a `purge` without --yes (a dry run).",
    ),
    ("1", "`scan`: something was detected (quarantined)."),
    (
        "2",
        "`scan`: some file failed (no verdict, unreadable, an error verdict after every attempt). \
         The quarantine and failed tools: the action was refused (no such entry, no longer kept, \
         another tool is at work on it, the bytes changed in quarantine, the target exists, the \
         file is missing, --to names a folder that does not exist). Never a usage error.",
    ),
    (
        "64",
        "Usage error (EX_USAGE): an unknown option, a missing argument, a value that does not parse.",
    ),
    (
        "69",
        "Unavailable (EX_UNAVAILABLE): KATA unreachable or failing, the journal or a folder failed, \
         a fatal runtime error; `scan --max-time` ran out. systemd restarts the agent.",
    ),
    (
        "75",
        "Another `run` or `scan` of the inboxes holds the state folder's lock (EX_TEMPFAIL); the \
         message names its PID. `scan PATH` takes no lock.",
    ),
    (
        "76",
        "The server is not who it should be (untrusted certificate, pin mismatch) or answers \
         garbage (no TLS, plain HTTP, unparsable answers).",
    ),
    (
        "77",
        "The server refuses our credentials (401: the integration is not accepted yet; client \
         certificate refused).",
    ),
    (
        "78",
        "Configuration error (EX_CONFIG), with file, line and key: also a folder the service user \
         cannot write, a key readable by others, a second agent on one staging folder. The unit \
         does not restart on 76, 77 and 78.",
    ),
    (
        "130",
        "Interrupted: a second SIGINT or SIGTERM, or `scan` stopped by a signal.",
    ),
];

const FILES: [(&str, &str); 8] = [
    (
        "/etc/dropscan/dropscan.toml",
        "The configuration (dropscan.toml(5)); --config or DROPSCAN_CONFIG name another.",
    ),
    (
        "/var/lib/dropscan/journal.sqlite",
        "The journal ([state] dir): every file's state, the quarantine and failed entries and their \
         audit records. `status` and the tools read it while the agent runs.",
    ),
    (
        "/var/lib/dropscan/dropscan.lock",
        "Held by `run` and by `scan` of the inboxes: one agent per state folder.",
    ),
    (
        "/var/lib/dropscan/custody/ID.lock",
        "Held by a quarantine or failed tool while it works on entry ID.",
    ),
    (
        "INBOX/.dropscan/INSTANCE/",
        "The staging folder of a watch: INSTANCE is [server] sensor_instance_id, or the host name \
         when it is not set.",
    ),
    (
        "NAME.dropscan.json",
        "The sidecar beside each file in quarantine or failed: original path, size, SHA-256, \
         scanIds, verdict or reason, times.",
    ),
    (
        "/usr/lib/systemd/system/dropscan.service",
        "The unit: Type=notify, sandboxed, `check --offline` before each start.",
    ),
    (
        "/usr/lib/sysctl.d/60-dropscan.conf",
        "Raises fs.inotify.max_user_watches and max_queued_events for large inboxes.",
    ),
];

const SIGNALS: [(&str, &str); 2] = [
    (
        "SIGINT, SIGTERM",
        "Stop: the inboxes are no longer read, work in flight gets [state] shutdown_grace, and \
         what is unfinished resumes at the next start (the journal knows it). A second signal \
         exits at once (130).",
    ),
    (
        "SIGHUP",
        "`run` reads the configuration again (systemctl reload dropscan): a valid one replaces the \
         running agent through a graceful stop, a bad one is refused and logged, and the agent \
         goes on. [log] changes need a restart.",
    ),
];

const ENVIRONMENT: [(&str, &str); 4] = [
    (
        "DROPSCAN_CONFIG",
        "The configuration file when --config is not given (default /etc/dropscan/dropscan.toml).",
    ),
    (
        "RUST_LOG",
        "A tracing filter (e.g. info,dropscan=debug) that overrides [log] level.",
    ),
    (
        "NOTIFY_SOCKET, WATCHDOG_USEC",
        "Set by systemd: the agent then says READY=1 once every stage runs, keeps STATUS= current, \
         pings the watchdog and says STOPPING=1.",
    ),
    (
        "SUDO_USER",
        "Named in the audit records of the quarantine and failed tools as the user behind sudo.",
    ),
];

/// The pages every SEE ALSO names (a page does not name itself).
const SEE_ALSO: [&str; 6] = [
    "dropscan(1)",
    "dropscan-run(1)",
    "dropscan-check(1)",
    "dropscan-quarantine(1)",
    "dropscan.toml(5)",
    "systemctl(1)",
];

/// The sections added to the man page of `page` (`dropscan`, `dropscan-run`, …), as roff.
pub fn extra_sections(page: &str) -> String {
    let mut out = String::from(".SH \"EXIT STATUS\"\n");
    for (code, text) in EXIT_STATUS {
        tp(&mut out, code, text);
    }
    out.push_str(".SH FILES\n");
    for (file, text) in FILES {
        tp(&mut out, file, text);
    }
    out.push_str(".SH SIGNALS\n");
    for (signal, text) in SIGNALS {
        tp(&mut out, signal, text);
    }
    out.push_str(".SH ENVIRONMENT\n");
    for (var, text) in ENVIRONMENT {
        tp(&mut out, var, text);
    }
    out.push_str(".SH \"SEE ALSO\"\n");
    let own = format!("{page}(1)");
    let pages: Vec<String> = SEE_ALSO
        .iter()
        .filter(|p| **p != own)
        .map(|p| roff(p))
        .collect();
    out.push_str(&pages.join(",\n"));
    out.push_str(",\njournalctl(1)\n");
    out
}

/// Adds [`extra_sections`] to a page clap_mangen rendered: before its VERSION section (the
/// sections a reader looks for come before the version), or at the end.
pub fn with_extra_sections(page: &str, rendered: &str) -> String {
    let extra = extra_sections(page);
    match rendered.find("\n.SH VERSION") {
        Some(at) => format!("{}\n{extra}{}", &rendered[..at], &rendered[at + 1..]),
        None => format!("{rendered}{extra}"),
    }
}

/// One piece of the example configuration.
#[derive(Debug, PartialEq, Eq)]
enum Piece {
    /// Prose (comment lines without a key after them).
    Prose(Vec<String>),
    /// A table header, `[server]` or `[[watch]]`.
    Table(String),
    /// Keys (`key = value`, each with its inline comment) documented by the text before them.
    Keys(Vec<String>, Vec<String>),
    /// A commented example (`# [[hook]]` and the comment lines after it).
    Example(Vec<String>),
}

/// `key = value` (the text of a line or of a comment): the key, when it is one.
fn key_of(text: &str) -> Option<&str> {
    let (key, _) = text.split_once(" = ")?;
    (!key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')).then_some(key)
}

/// Splits the example configuration into [`Piece`]s.
fn pieces(text: &str) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut comment: Vec<String> = Vec::new();
    let mut keys: Option<(Vec<String>, Vec<String>)> = None;
    let mut example: Option<Vec<String>> = None;
    let flush = |out: &mut Vec<Piece>,
                 comment: &mut Vec<String>,
                 keys: &mut Option<(Vec<String>, Vec<String>)>| {
        if let Some((k, t)) = keys.take() {
            out.push(Piece::Keys(k, t));
        }
        if !comment.is_empty() {
            out.push(Piece::Prose(std::mem::take(comment)));
        }
    };
    for line in text.lines() {
        let trimmed = line.trim();
        let comment_text = trimmed
            .strip_prefix('#')
            .map(|c| c.strip_prefix(' ').unwrap_or(c));
        if let Some(ex) = example.as_mut() {
            if let Some(c) = comment_text {
                ex.push(c.to_string());
                continue;
            }
            out.push(Piece::Example(example.take().unwrap_or_default()));
        }
        match comment_text {
            Some(c) if c.starts_with("[[") || c.starts_with('[') && c.ends_with(']') => {
                flush(&mut out, &mut comment, &mut keys);
                example = Some(vec![c.to_string()]);
            }
            Some(c) if key_of(c).is_some() && !out.is_empty() => {
                // A key without a default, shown commented out.
                let doc = std::mem::take(&mut comment);
                match keys.as_mut() {
                    Some((k, _)) if doc.is_empty() => k.push(c.to_string()),
                    _ => {
                        flush(&mut out, &mut Vec::new(), &mut keys);
                        keys = Some((vec![c.to_string()], doc));
                    }
                }
            }
            Some(c) => {
                if let Some((k, t)) = keys.take() {
                    out.push(Piece::Keys(k, t));
                }
                comment.push(c.to_string());
            }
            None if trimmed.is_empty() => flush(&mut out, &mut comment, &mut keys),
            None if trimmed.starts_with('[') => {
                flush(&mut out, &mut comment, &mut keys);
                out.push(Piece::Table(trimmed.to_string()));
            }
            None => {
                let doc = std::mem::take(&mut comment);
                match keys.as_mut() {
                    Some((k, _)) if doc.is_empty() => k.push(trimmed.to_string()),
                    _ => {
                        flush(&mut out, &mut Vec::new(), &mut keys);
                        keys = Some((vec![trimmed.to_string()], doc));
                    }
                }
            }
        }
    }
    if let Some(ex) = example.take() {
        out.push(Piece::Example(ex));
    }
    flush(&mut out, &mut comment, &mut keys);
    out
}

/// Comment lines as roff: prose filled, indented lines (JSON shapes) kept as they are.
fn text_lines(out: &mut String, lines: &[String]) {
    let mut verbatim = false;
    for l in lines {
        if l.is_empty() {
            if verbatim {
                out.push_str(".fi\n");
                verbatim = false;
            }
            out.push_str(".sp\n");
            continue;
        }
        let indented = l.starts_with(' ');
        if indented != verbatim {
            out.push_str(if indented { ".nf\n" } else { ".fi\n" });
            verbatim = indented;
        }
        out.push_str(&roff(l));
        out.push('\n');
    }
    if verbatim {
        out.push_str(".fi\n");
    }
}

/// `dropscan.toml(5)`: the example configuration as a man page.
pub fn config_page(version: &str) -> String {
    let mut out = format!(
        ".TH dropscan.toml 5 \"\" \"dropscan {}\" \"dropscan manual\"\n\
         .SH NAME\ndropscan.toml \\- configuration of dropscan(1)\n\
         .SH SYNOPSIS\n/etc/dropscan/dropscan.toml\n.SH DESCRIPTION\n",
        roff(version)
    );
    let mut in_tables = false;
    for piece in pieces(EXAMPLE_CONFIG) {
        match piece {
            Piece::Prose(lines) => {
                out.push_str(".PP\n");
                text_lines(&mut out, &lines);
            }
            Piece::Table(name) => {
                if !in_tables {
                    out.push_str(".SH KEYS\n");
                    in_tables = true;
                }
                out.push_str(&format!(".SS \"{}\"\n", roff(&name)));
            }
            Piece::Keys(keys, doc) => {
                let mut notes = Vec::new();
                for (i, k) in keys.iter().enumerate() {
                    let (setting, note) = match k.split_once("  #") {
                        Some((s, n)) => (s.trim_end(), Some(n.trim())),
                        None => (k.as_str(), None),
                    };
                    let (key, value) = setting.split_once(" = ").unwrap_or((setting, ""));
                    out.push_str(if i == 0 { ".TP\n" } else { ".TQ\n" });
                    out.push_str(&format!("\\fB{}\\fR = {}\n", roff(key), roff(value)));
                    if let Some(n) = note {
                        notes.push(format!("{key}: {n}."));
                    }
                }
                let mut body = doc;
                body.extend(notes);
                if body.is_empty() {
                    body.push("See above.".into());
                }
                text_lines(&mut out, &body);
            }
            Piece::Example(lines) => {
                out.push_str(".PP\nFor example:\n.RS\n.nf\n");
                for l in &lines {
                    out.push_str(&roff(l));
                    out.push('\n');
                }
                out.push_str(".fi\n.RE\n");
            }
        }
    }
    out.push_str(
        ".SH FILES\n.TP\n/etc/dropscan/dropscan.toml\nThe configuration \\fBrun\\fR and the \
         tools read by default.\n.TP\n/usr/share/doc/dropscan/examples/dropscan.toml\nThis \
         page's source: every key with its default.\n.SH \"SEE ALSO\"\ndropscan(1),\n\
         dropscan\\-check(1),\ndropscan\\-run(1)\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_prose_tables_and_examples_are_told_apart() {
        let text = "# intro\n\n[server]\n# the url\nurl = \"x\"\n# two keys\na_b = 1\nc = 2  # inline\n\
                    # optional\n# opt = \"y\"\n\n# [[hook]]\n# on = []\n#\n# # nested\n\n[log]\n";
        let p = pieces(text);
        assert_eq!(
            p,
            [
                Piece::Prose(vec!["intro".into()]),
                Piece::Table("[server]".into()),
                Piece::Keys(vec!["url = \"x\"".into()], vec!["the url".into()]),
                Piece::Keys(
                    vec!["a_b = 1".into(), "c = 2  # inline".into()],
                    vec!["two keys".into()]
                ),
                Piece::Keys(vec!["opt = \"y\"".into()], vec!["optional".into()]),
                Piece::Example(vec![
                    "[[hook]]".into(),
                    "on = []".into(),
                    String::new(),
                    "# nested".into()
                ]),
                Piece::Table("[log]".into()),
            ]
        );
    }

    #[test]
    fn roff_escapes_what_roff_would_read_as_markup() {
        assert_eq!(roff(".hidden"), "\\&.hidden");
        assert_eq!(roff("--config a\\b"), "\\-\\-config a\\eb");
    }
}
