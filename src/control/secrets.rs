//! Where a connector's source password comes from, and keeping it out of
//! places it must not reach. The password may be in the connector's `data`
//! (as `synchdb_add_conninfo` stores it), or — to keep it out of `pg_dump`
//! output and of statement logs — set with `synchdb_set_password` into
//! `synchdb_secrets` (a superuser-only table that is not part of the
//! extension's dumped configuration), or read from a libpq-style password
//! file (`data.passfile`, else `~/.pgpass` of the server's OS user). Also
//! keeps the statement of a failing call that carries a secret out of the
//! server log.

use crate::control::conninfo::ConnInfo;
use pgrx::prelude::*;

/// Before an ERROR raised by a synchdb function: the server log gets the
/// message but not the statement (`log_min_error_statement`), which may
/// hold a password. Transaction-local: the abort undoes it.
pub fn hide_statement() {
    // SAFETY: setting a GUC by name, in the current transaction only.
    unsafe {
        pg_sys::set_config_option(
            c"log_min_error_statement".as_ptr(),
            c"panic".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            0,
            false,
        );
    }
}

/// Fills an empty password from `synchdb_secrets`, else from the password
/// file. Called wherever a connector definition is loaded.
pub fn fill_password(name: &str, mut info: ConnInfo) -> ConnInfo {
    if !info.pwd.is_empty() {
        return info;
    }
    if let Ok(Some(pwd)) = Spi::get_one_with_args::<String>(
        "SELECT pwd FROM public.synchdb_secrets WHERE name = $1",
        &[name.into()],
    ) {
        info.pwd = pwd;
        return info;
    }
    let path = match info.passfile.trim() {
        "" => std::env::var("HOME")
            .map(|h| format!("{h}/.pgpass"))
            .unwrap_or_default(),
        p => p.to_string(),
    };
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Some(p) = passfile_lookup(
            &text,
            &info.hostname,
            &info.port.to_string(),
            &info.srcdb,
            &info.user,
        ) {
            info.pwd = p;
        }
    }
    info
}

/// Splits one password-file line into its five fields (`\:` and `\\`
/// escaped); `None` for comments and malformed lines.
fn fields(line: &str) -> Option<Vec<String>> {
    if line.trim_start().starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let mut out = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    out.last_mut()?.push(n);
                }
            }
            ':' if out.len() < 5 => out.push(String::new()),
            c => out.last_mut()?.push(c),
        }
    }
    (out.len() == 5).then_some(out)
}

/// The password of the first matching line of a libpq password file
/// (`hostname:port:database:username:password`, `*` matching anything).
pub fn passfile_lookup(text: &str, host: &str, port: &str, db: &str, user: &str) -> Option<String> {
    let want = [host, port, db, user];
    text.lines()
        .filter_map(fields)
        .find(|f| f.iter().zip(want).all(|(have, w)| have == "*" || have == w))
        .and_then(|mut f| f.pop())
}

/// Sets (or, with NULL, removes) the source password of connector `name`
/// outside its `data`: not dumped by `pg_dump`, never shown. The
/// connector's `data.pwd` is cleared so that this one is used.
#[pg_extern]
fn synchdb_set_password(name: &str, pwd: Option<&str>) -> i32 {
    hide_statement();
    if crate::control::api::load_conninfo(name).is_none() {
        crate::control::api::unknown_connector(name);
    }
    let r = match pwd {
        Some(p) => Spi::run_with_args(
            "INSERT INTO public.synchdb_secrets (name, pwd) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET pwd = EXCLUDED.pwd",
            &[name.into(), p.into()],
        ),
        None => Spi::run_with_args(
            "DELETE FROM public.synchdb_secrets WHERE name = $1",
            &[name.into()],
        ),
    }
    .and_then(|_| {
        Spi::run_with_args(
            "UPDATE public.synchdb_conninfo SET data = data - 'pwd' WHERE name = $1",
            &[name.into()],
        )
    });
    if let Err(e) = r {
        crate::control::api::raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("synchdb catalog access failed: {e}"),
            None,
            None,
        );
    }
    0
}

#[cfg(test)]
mod tests {
    use super::passfile_lookup;

    #[test]
    fn passfile_matching() {
        let text = "# comment\n\
                    otherhost:5432:*:u:nope\n\
                    127.0.0.1:5433:app:repl:s3cr\\:et\n\
                    *:*:*:repl:fallback\n";
        assert_eq!(
            passfile_lookup(text, "127.0.0.1", "5433", "app", "repl").as_deref(),
            Some("s3cr:et")
        );
        assert_eq!(
            passfile_lookup(text, "10.0.0.1", "5432", "x", "repl").as_deref(),
            Some("fallback")
        );
        assert_eq!(passfile_lookup(text, "h", "1", "d", "nobody"), None);
        // Malformed lines (too few fields) are skipped, never a panic.
        assert_eq!(passfile_lookup("a:b:c\n\\", "a", "b", "c", "d"), None);
        assert_eq!(passfile_lookup("", "a", "b", "c", "d"), None);
    }
}
