//! Lints the contract from its descriptor set, so a proto change that
//! breaks the house rules or an old client fails here, not in a frontend:
//! - files are `spine/<name>/v1/<name>.proto` in package `spine.<name>.v1`;
//! - services, methods, messages and enums are PascalCase, fields
//!   lower_snake_case, enum values UPPER_SNAKE_CASE prefixed with their
//!   enum's name, and every enum's zero value is `<PREFIX>_UNSPECIFIED`;
//! - a unary or server-streaming method `Foo` takes `FooRequest`, used by no
//!   other method of its service, and returns `FooResponse` or a message of
//!   Spine's own (never `google.protobuf.Empty`, never another request);
//! - field numbers are forever: every field ever published is listed in
//!   `proto/fields.lock`; a field that is gone must have its number (and
//!   name) reserved, and a number may never change its name or type.
//!   A new field is added to the lock with `SPINE_UPDATE_PROTO_LOCK=1`.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;
use prost_types::{DescriptorProto, FileDescriptorSet};

fn set() -> FileDescriptorSet {
    FileDescriptorSet::decode(spine_proto::FILE_DESCRIPTOR_SET).unwrap()
}

fn spine_files(s: &FileDescriptorSet) -> impl Iterator<Item = &prost_types::FileDescriptorProto> {
    s.file.iter().filter(|f| f.package().starts_with("spine."))
}

fn is_pascal(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && s.chars().all(|c| c.is_ascii_alphanumeric())
        && !s.contains(char::is_whitespace)
}

fn is_snake(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.contains("__")
}

fn upper_snake(pascal: &str) -> String {
    let mut out = String::new();
    for (i, c) in pascal.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Every message, nested ones included, with its full name.
fn messages<'a>(prefix: &str, ms: &'a [DescriptorProto], out: &mut Vec<(String, &'a DescriptorProto)>) {
    for m in ms {
        let name = format!("{prefix}.{}", m.name());
        messages(&name, &m.nested_type, out);
        out.push((name, m));
    }
}

#[test]
fn files_and_packages_follow_the_layout() {
    let mut problems = Vec::new();
    for f in spine_files(&set()) {
        let parts: Vec<&str> = f.package().split('.').collect();
        let ok = parts.len() == 3
            && parts[0] == "spine"
            && parts[2] == "v1"
            && f.name() == format!("spine/{}/v1/{}.proto", parts[1], parts[1]);
        if !ok {
            problems.push(format!("{} declares package {}", f.name(), f.package()));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn names_follow_the_style() {
    let s = set();
    let mut problems = Vec::new();
    for f in spine_files(&s) {
        for svc in &f.service {
            if !is_pascal(svc.name()) {
                problems.push(format!("service {}", svc.name()));
            }
            for m in &svc.method {
                if !is_pascal(m.name()) {
                    problems.push(format!("method {}.{}", svc.name(), m.name()));
                }
            }
        }
        let mut all = Vec::new();
        messages(f.package(), &f.message_type, &mut all);
        let mut enums: Vec<(String, &prost_types::EnumDescriptorProto)> =
            f.enum_type.iter().map(|e| (e.name().to_string(), e)).collect();
        for (name, m) in &all {
            let short = name.rsplit('.').next().unwrap();
            if !is_pascal(short) {
                problems.push(format!("message {name}"));
            }
            for field in &m.field {
                if !is_snake(field.name()) {
                    problems.push(format!("field {name}.{}", field.name()));
                }
            }
            enums.extend(m.enum_type.iter().map(|e| (e.name().to_string(), e)));
        }
        for (name, e) in enums {
            let prefix = upper_snake(&name);
            if !is_pascal(&name) {
                problems.push(format!("enum {name}"));
            }
            for v in &e.value {
                if !v.name().starts_with(&format!("{prefix}_"))
                    || !v.name().chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                {
                    problems.push(format!("enum value {name}.{} (want {prefix}_*)", v.name()));
                }
            }
            match e.value.iter().find(|v| v.number() == 0) {
                Some(v) if v.name() == format!("{prefix}_UNSPECIFIED") => {}
                _ => problems.push(format!("enum {name}: the zero value must be {prefix}_UNSPECIFIED")),
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn methods_take_their_own_request_and_return_a_spine_message() {
    let s = set();
    let mut problems = Vec::new();
    let requests: BTreeSet<String> = spine_files(&s)
        .flat_map(|f| f.service.iter().flat_map(|svc| svc.method.iter().map(|m| m.input_type().to_string())))
        .collect();
    for f in spine_files(&s) {
        for svc in &f.service {
            let mut seen = BTreeSet::new();
            for m in &svc.method {
                let at = format!("{}.{}", svc.name(), m.name());
                if m.client_streaming() {
                    // A bidirectional session carries many kinds of message;
                    // its envelope names are free.
                    continue;
                }
                let want = format!(".{}.{}Request", f.package(), m.name());
                if m.input_type() != want {
                    problems.push(format!("{at} takes {}, want {want}", m.input_type()));
                }
                if !seen.insert(m.input_type()) {
                    problems.push(format!("{at}: {} is used by another method", m.input_type()));
                }
                let out = m.output_type();
                if !out.starts_with(".spine.") {
                    problems.push(format!("{at} returns {out}: return a message of Spine's own"));
                }
                if out.ends_with("Request") || requests.contains(out) {
                    problems.push(format!("{at} returns a request message {out}"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// `message number name type` for every field, sorted.
fn current_fields(s: &FileDescriptorSet) -> BTreeMap<(String, i32), (String, String)> {
    let mut out = BTreeMap::new();
    for f in spine_files(s) {
        let mut all = Vec::new();
        messages(f.package(), &f.message_type, &mut all);
        for (name, m) in all {
            for field in &m.field {
                let ty = if field.type_name().is_empty() {
                    format!("{:?}", field.r#type()).to_lowercase()
                } else {
                    field.type_name().trim_start_matches('.').to_string()
                };
                let label = if field.label() == prost_types::field_descriptor_proto::Label::Repeated {
                    "repeated "
                } else {
                    ""
                };
                out.insert((name.clone(), field.number()), (field.name().to_string(), format!("{label}{ty}")));
            }
        }
    }
    out
}

fn reserved(s: &FileDescriptorSet, message: &str) -> (Vec<(i32, i32)>, Vec<String>) {
    for f in spine_files(s) {
        let mut all = Vec::new();
        messages(f.package(), &f.message_type, &mut all);
        if let Some((_, m)) = all.into_iter().find(|(n, _)| n == message) {
            let ranges = m.reserved_range.iter().map(|r| (r.start(), r.end())).collect();
            return (ranges, m.reserved_name.clone());
        }
    }
    (Vec::new(), Vec::new())
}

type Fields = BTreeMap<(String, i32), (String, String)>;

fn read_lock(text: &str) -> Fields {
    let mut locked = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let mut it = line.splitn(4, ' ');
        let (m, n, name, ty) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        locked.insert((m.to_string(), n.parse::<i32>().unwrap()), (name.to_string(), ty.to_string()));
    }
    locked
}

/// What breaks old clients: locked fields renamed, retyped, or gone
/// without their number and name reserved.
fn lock_problems(s: &FileDescriptorSet, locked: &Fields) -> Vec<String> {
    let now = current_fields(s);
    let mut problems = Vec::new();
    for ((message, number), (name, ty)) in locked {
        match now.get(&(message.clone(), *number)) {
            Some((n, t)) if n == name && t == ty => {}
            Some((n, t)) => problems.push(format!("{message} field {number} was `{ty} {name}`, is now `{t} {n}`")),
            None => {
                let (ranges, names) = reserved(s, message);
                if !ranges.iter().any(|(a, b)| (*a..*b).contains(number)) || !names.contains(name) {
                    problems.push(format!(
                        "{message} field {number} ({name}) was removed: add `reserved {number};` and `reserved \"{name}\";`"
                    ));
                }
            }
        }
    }
    problems
}

#[test]
fn published_field_numbers_are_never_reused() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fields.lock");
    let s = set();
    let locked = read_lock(&std::fs::read_to_string(path).unwrap_or_default());
    let problems = lock_problems(&s, &locked);
    assert!(problems.is_empty(), "{problems:#?}");
    let now = current_fields(&s);
    let new: Vec<_> = now.keys().filter(|k| !locked.contains_key(*k)).collect();
    if std::env::var_os("SPINE_UPDATE_PROTO_LOCK").is_some() {
        let mut out = String::from(
            "# Every field ever published: message, number, name, type. Written by\n\
             # `SPINE_UPDATE_PROTO_LOCK=1 cargo test -p spine-proto --test lint`; never\n\
             # edit or delete a line (proto/tests/lint.rs).\n",
        );
        let mut all = locked.clone();
        all.extend(now);
        for ((m, n), (name, ty)) in all {
            out.push_str(&format!("{m} {n} {name} {ty}\n"));
        }
        std::fs::write(path, out).unwrap();
        return;
    }
    assert!(
        new.is_empty(),
        "{} new fields not yet in proto/fields.lock (run SPINE_UPDATE_PROTO_LOCK=1 cargo test -p spine-proto \
         --test lint), such as {:?}",
        new.len(),
        &new[..new.len().min(5)]
    );
}

#[test]
fn the_lock_catches_a_removed_renamed_or_retyped_field() {
    let s = set();
    let locked = current_fields(&s);
    assert!(lock_problems(&s, &locked).is_empty());
    let mut changed = s;
    let groups = changed.file.iter_mut().find(|f| f.package() == "spine.groups.v1").unwrap();
    let group = groups.message_type.iter_mut().find(|m| m.name() == "Group").unwrap();
    // Removed without reservation.
    let removed = group.field.remove(0);
    let p = lock_problems(&changed, &locked);
    assert!(p.len() == 1 && p[0].contains("was removed"), "{p:?}");
    // Reserved by number and name: fine.
    let groups = changed.file.iter_mut().find(|f| f.package() == "spine.groups.v1").unwrap();
    let group = groups.message_type.iter_mut().find(|m| m.name() == "Group").unwrap();
    group
        .reserved_range
        .push(prost_types::descriptor_proto::ReservedRange { start: removed.number, end: Some(removed.number() + 1) });
    group.reserved_name.push(removed.name().to_string());
    assert!(lock_problems(&changed, &locked).is_empty());
    // A number reused under another name.
    let group = changed.file.iter_mut().find(|f| f.package() == "spine.groups.v1").unwrap();
    let group = group.message_type.iter_mut().find(|m| m.name() == "Group").unwrap();
    let mut renamed = removed;
    renamed.name = Some("something_else".into());
    group.field.push(renamed);
    group.reserved_name.clear();
    group.reserved_range.clear();
    let p = lock_problems(&changed, &locked);
    assert!(p.len() == 1 && p[0].contains("is now"), "{p:?}");
}

#[test]
fn the_lint_sees_what_it_checks() {
    // Guards the lint itself: a descriptor set without Spine's files would
    // pass every rule above vacuously.
    let s = set();
    assert!(spine_files(&s).count() >= 5);
    assert!(current_fields(&s).len() > 200);
    assert_eq!(upper_snake("EntryKind"), "ENTRY_KIND");
    assert!(is_snake("from_seq") && !is_snake("fromSeq") && is_pascal("SendCommit") && !is_pascal("send_commit"));
}
