//! Where a key is written: the TOML parser's spans (`toml::de::DeTable`), turned into 1-based
//! line numbers and dotted keys such as `server.url` or `watch[1].settle`.
//!
//! Owns the mapping between the text and the keys in both directions (key → line for validation
//! errors, offset → key for the parser's value errors). It does not decide what is valid.

use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One key with a scalar (or inline array) value: its dotted name and where it is written.
struct Leaf {
    name: String,
    key: Range<usize>,
    value: Range<usize>,
}

/// Every leaf of the document, in file order; empty when the text is not TOML.
fn leaves(text: &str) -> Vec<Leaf> {
    let mut out = Vec::new();
    if let Ok(root) = DeTable::parse(text) {
        walk(root.get_ref(), "", &mut out);
    }
    out.sort_by_key(|l| l.key.start);
    out
}

fn walk(table: &DeTable<'_>, prefix: &str, out: &mut Vec<Leaf>) {
    for (key, value) in table {
        let name = if prefix.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{prefix}.{}", key.get_ref())
        };
        leaf_or_walk(name, key, value, out);
    }
}

fn leaf_or_walk(
    name: String,
    key: &Spanned<std::borrow::Cow<'_, str>>,
    value: &Spanned<DeValue<'_>>,
    out: &mut Vec<Leaf>,
) {
    match value.get_ref() {
        DeValue::Table(t) => walk(t, &name, out),
        DeValue::Array(items)
            if !items.is_empty() && items.iter().all(|i| i.get_ref().is_table()) =>
        {
            for (i, item) in items.iter().enumerate() {
                if let DeValue::Table(t) = item.get_ref() {
                    walk(t, &format!("{name}[{i}]"), out);
                }
            }
        }
        _ => out.push(Leaf {
            name,
            key: key.span(),
            value: value.span(),
        }),
    }
}

/// The 1-based line of byte `offset` in `text`.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The line (1-based) where a dotted key such as `server.url` or `watch[1].settle` is written.
/// Anything after the field name (` / other_key`) is ignored: the first key names the line.
pub(crate) fn locate(text: &str, key: &str) -> Option<usize> {
    let (table, field) = key.split_once('.')?;
    let field = field.split([' ', '/']).next()?.trim();
    let wanted = format!("{table}.{field}");
    leaves(text)
        .into_iter()
        .find(|l| l.name == wanted)
        .map(|l| line_of(text, l.key.start))
}

/// The dotted key whose value is written at byte `offset`, if any (not its name: an unknown key
/// is the parser's to report).
pub(crate) fn key_at(text: &str, offset: usize) -> Option<String> {
    leaves(text)
        .into_iter()
        .find(|l| l.value.contains(&offset))
        .map(|l| l.name)
}
