//! Row changes and TRUNCATE applied to the destination: through the
//! executor (`direct`) where the table allows it, else through prepared SPI
//! statements cached per (relation, operation, column set), each as the
//! table's owner when that is not the worker's role.

use super::*;

impl Applier<'_> {
    pub(super) fn change(&mut self, rel_id: u32, f: impl FnOnce(&mut Self, u32)) {
        self.current_rel_id = Some(rel_id);
        if self.ready(rel_id) {
            f(self, rel_id)
        }
    }

    pub(super) fn plan(
        &mut self,
        rel_id: u32,
        op: u8,
        mask: Vec<bool>,
        build: impl FnOnce(&RelEntry) -> (String, Vec<pg_sys::Oid>),
    ) -> pg_sys::SPIPlanPtr {
        // Every prepared-statement change goes through here first.
        if !self.spi {
            unsafe { pg_sys::SPI_connect() };
            self.spi = true;
        }
        let Some(entry) = self.rels.get_mut(&rel_id) else {
            pgrx::error!("unknown relation id {rel_id}");
        };
        if let Some(p) = entry.plans.get(&(op, mask.clone())) {
            return *p;
        }
        let (sql, mut types) = build(entry);
        let csql = CString::new(sql).unwrap_or_default();
        let plan = unsafe {
            let nargs = c_int::try_from(types.len()).unwrap_or(0);
            let p = pg_sys::SPI_prepare(csql.as_ptr(), nargs, types.as_mut_ptr());
            if p.is_null() {
                pgrx::error!(
                    "could not prepare statement for {}.{}",
                    entry.rel.namespace,
                    entry.rel.name
                );
            }
            pg_sys::SPI_keepplan(p);
            p
        };
        entry.plans.insert((op, mask), plan);
        plan
    }

    pub(super) fn insert(&mut self, rel_id: u32, new: Vec<TupleValue>) {
        let entry = &self.rels[&rel_id];
        if let Some(t) = entry.direct {
            let mut text = text_buffer(&[&new]);
            let vals = attr_inputs(entry, (0..new.len()).map(|i| (i, &new[i])), &mut text);
            // The values are copied: let go of the message (a large value
            // is then held once by this change, not twice).
            drop(new);
            usercontext::as_role(entry.run_as, || {
                direct::insert(&t, self.change_cxt.value(), &mut text, &vals)
            });
            return;
        }
        let new = &new[..];
        let cols: Vec<usize> = (0..entry.rel.columns.len())
            .filter(|i| !matches!(new.get(*i), Some(TupleValue::Unchanged) | None))
            .collect();
        let mask: Vec<bool> = (0..entry.rel.columns.len())
            .map(|i| cols.contains(&i))
            .collect();
        let plan = self.plan(rel_id, b'I', mask, |e| {
            let t = target_of(e);
            let names: Vec<&str> = cols
                .iter()
                .map(|i| e.rel.columns[*i].name.as_str())
                .collect();
            (
                with_transforms(
                    e,
                    sqlgen::insert(&t.dst_schema, &t.dst_table, &names),
                    &cols,
                ),
                types_of(e, &cols),
            )
        });
        let entry = &self.rels[&rel_id];
        let vals: Vec<(usize, &TupleValue)> = cols.iter().map(|i| (*i, &new[*i])).collect();
        let n = self.execute(entry, plan, &vals);
        let _ = n;
    }

    pub(super) fn key_columns(entry: &RelEntry) -> Vec<usize> {
        (0..entry.rel.columns.len())
            .filter(|i| entry.rel.columns[*i].is_key)
            .collect()
    }

    pub(super) fn update(
        &mut self,
        rel_id: u32,
        old: Option<&(OldKind, Vec<TupleValue>)>,
        new: &[TupleValue],
    ) {
        let entry = &self.rels[&rel_id];
        let ncols = entry.rel.columns.len();
        if let (Some(t), None | Some((OldKind::Key, _))) =
            (entry.direct.filter(|t| t.has_key()), old)
        {
            let key_src: &[TupleValue] = match old {
                Some((_, vals)) => vals,
                None => new,
            };
            let keys = Self::key_columns(entry);
            let mut text = text_buffer(&[key_src, new]);
            let key = attr_inputs(
                entry,
                keys.iter().filter_map(|i| key_src.get(*i).map(|v| (*i, v))),
                &mut text,
            );
            let vals = attr_inputs(entry, (0..new.len()).map(|i| (i, &new[i])), &mut text);
            let found = usercontext::as_role(entry.run_as, || {
                direct::update(&t, self.change_cxt.value(), &mut text, &key, &vals)
            });
            if !found {
                self.missing_row("UPDATE", rel_id);
            }
            return;
        }
        let set_cols: Vec<usize> = (0..ncols)
            .filter(|i| !matches!(new.get(*i), Some(TupleValue::Unchanged) | None))
            .collect();
        let (how, key_cols, key_src): (KeyMatch, Vec<usize>, &[TupleValue]) = match old {
            Some((OldKind::Full, vals)) => (
                KeyMatch::Full,
                (0..ncols)
                    .filter(|i| !matches!(vals.get(*i), Some(TupleValue::Unchanged) | None))
                    .collect(),
                vals,
            ),
            Some((OldKind::Key, vals)) => (KeyMatch::Key, Self::key_columns(entry), vals),
            None => (KeyMatch::Key, Self::key_columns(entry), new),
        };
        if key_cols.is_empty() {
            pgrx::error!(
                "cannot apply UPDATE to {}.{}: the source table has no replica identity (add a primary key or set REPLICA IDENTITY FULL on the source)",
                entry.rel.namespace,
                entry.rel.name
            );
        }
        let mut mask: Vec<bool> = (0..ncols).map(|i| set_cols.contains(&i)).collect();
        mask.extend((0..ncols).map(|i| key_cols.contains(&i)));
        mask.push(how == KeyMatch::Full);
        let plan = self.plan(rel_id, b'U', mask, |e| {
            let t = target_of(e);
            let sets: Vec<&str> = set_cols
                .iter()
                .map(|i| e.rel.columns[*i].name.as_str())
                .collect();
            let keys: Vec<&str> = key_cols
                .iter()
                .map(|i| e.rel.columns[*i].name.as_str())
                .collect();
            let mut types = types_of(e, &set_cols);
            types.extend(types_of(e, &key_cols));
            let params: Vec<usize> = set_cols.iter().chain(&key_cols).copied().collect();
            (
                with_transforms(
                    e,
                    sqlgen::update(
                        &t.dst_schema,
                        &t.dst_table,
                        &sets,
                        &keys,
                        &by_text(e, &key_cols),
                        how,
                    ),
                    &params,
                ),
                types,
            )
        });
        let entry = &self.rels[&rel_id];
        let mut vals: Vec<(usize, &TupleValue)> = set_cols.iter().map(|i| (*i, &new[*i])).collect();
        for i in &key_cols {
            match key_src.get(*i) {
                Some(v) => vals.push((*i, v)),
                None => pgrx::error!("old tuple is shorter than the relation"),
            }
        }
        if self.execute(entry, plan, &vals) == 0 {
            self.missing_row("UPDATE", rel_id);
        }
    }

    pub(super) fn delete(&mut self, rel_id: u32, old: &(OldKind, Vec<TupleValue>)) {
        let entry = &self.rels[&rel_id];
        if let (Some(t), OldKind::Key) = (entry.direct.filter(|t| t.has_key()), old.0) {
            let keys = Self::key_columns(entry);
            let mut text = text_buffer(&[&old.1]);
            let key = attr_inputs(
                entry,
                keys.iter().filter_map(|i| old.1.get(*i).map(|v| (*i, v))),
                &mut text,
            );
            let found = usercontext::as_role(entry.run_as, || {
                direct::delete(&t, self.change_cxt.value(), &mut text, &key)
            });
            if !found {
                self.missing_row("DELETE", rel_id);
            }
            return;
        }
        let ncols = entry.rel.columns.len();
        let (how, key_cols) = match old.0 {
            OldKind::Full => (
                KeyMatch::Full,
                (0..ncols)
                    .filter(|i| !matches!(old.1.get(*i), Some(TupleValue::Unchanged) | None))
                    .collect::<Vec<_>>(),
            ),
            OldKind::Key => (KeyMatch::Key, Self::key_columns(entry)),
        };
        if key_cols.is_empty() {
            pgrx::error!(
                "cannot apply DELETE to {}.{}: the source table has no replica identity",
                entry.rel.namespace,
                entry.rel.name
            );
        }
        let mut mask: Vec<bool> = (0..ncols).map(|i| key_cols.contains(&i)).collect();
        mask.push(how == KeyMatch::Full);
        let plan = self.plan(rel_id, b'D', mask, |e| {
            let t = target_of(e);
            let keys: Vec<&str> = key_cols
                .iter()
                .map(|i| e.rel.columns[*i].name.as_str())
                .collect();
            (
                with_transforms(
                    e,
                    sqlgen::delete(
                        &t.dst_schema,
                        &t.dst_table,
                        &keys,
                        &by_text(e, &key_cols),
                        how,
                    ),
                    &key_cols,
                ),
                types_of(e, &key_cols),
            )
        });
        let entry = &self.rels[&rel_id];
        let mut vals = Vec::with_capacity(key_cols.len());
        for i in &key_cols {
            match old.1.get(*i) {
                Some(v) => vals.push((*i, v)),
                None => pgrx::error!("old tuple is shorter than the relation"),
            }
        }
        if self.execute(entry, plan, &vals) == 0 {
            self.missing_row("DELETE", rel_id);
        }
    }

    pub(super) fn missing_row(&mut self, op: &str, rel_id: u32) {
        self.counters.missing_rows += 1;
        if let Some(e) = self.rels.get(&rel_id) {
            pgrx::warning!(
                "synchdb: {op} on {}.{} found no row to change (remote transaction {}, commit LSN {}); the destination differs from the source",
                e.rel.namespace,
                e.rel.name,
                self.xid,
                crate::lsn::format_lsn(self.final_lsn)
            );
        }
    }

    pub(super) fn truncate(&mut self, rel_ids: &[u32], restart_identity: bool) {
        let mut targets = Vec::new();
        let mut roots_checked: Vec<u32> = Vec::new();
        for id in rel_ids {
            if !self.rels.contains_key(id) || !self.ready(*id) {
                continue;
            }
            let root = self.rels.get(id).map(|e| e.rel.id).unwrap_or(*id);
            if root != *id && !roots_checked.contains(&root) {
                roots_checked.push(root);
                self.truncate_partitions(root, rel_ids);
            }
            if let Some(e) = self.rels.get(id) {
                if let Some(t) = &e.target {
                    targets.push((e.run_as, (t.dst_schema.clone(), t.dst_table.clone())));
                }
            }
        }
        // One statement per owner, run as that owner (its TRUNCATE
        // triggers run with its rights): one statement in all when the
        // tables share an owner, as the source's TRUNCATE did.
        while let Some((run_as, _)) = targets.first().cloned() {
            let (mine, rest): (Vec<_>, Vec<_>) =
                targets.into_iter().partition(|(r, _)| *r == run_as);
            targets = rest;
            let tables: Vec<(String, String)> = mine.into_iter().map(|(_, t)| t).collect();
            let sql = sqlgen::truncate(&tables, restart_identity);
            if let Err(e) = usercontext::as_role(run_as, || Spi::run(&sql)) {
                pgrx::error!("{e}");
            }
        }
    }

    /// A TRUNCATE that names partitions of a captured partitioned table
    /// one by one (a source publishing partitions under their own names)
    /// empties the whole destination table only when it names every
    /// partition; otherwise the rows of the other partitions must stay, so
    /// the table is copied again (modes that copy) or the connector stops
    /// with an error saying why.
    pub(super) fn truncate_partitions(&mut self, root: u32, rel_ids: &[u32]) {
        let leaves = match self.catalog.partition_leaves(root) {
            Ok(l) => l,
            Err(e) => pgrx::error!("reading the partitions of source relation {root}: {e}"),
        };
        if leaves.iter().all(|l| rel_ids.contains(l)) {
            return;
        }
        let found = self
            .targets
            .iter()
            .find(|(_, t)| t.src_relid == root)
            .map(|(k, t)| (k.clone(), t.clone()));
        let Some((key, target)) = found else { return };
        self.counters.ddl += 1;
        if self.can_resync {
            self.resync = Some((key.clone(), target));
            pgrx::error!(
                "some partitions of source table {key} were truncated; the table is copied again"
            );
        }
        pgrx::error!(
            "some partitions of source table {key} were truncated; the destination table holds all partitions and cannot drop only theirs: restart the connector in mode always with snapshottable '{key}' to copy it again"
        );
    }

    /// Converts the values with the destination types' input functions and
    /// runs the plan, as the table's owner (a domain's CHECK runs in the
    /// input function); returns the number of rows processed.
    pub(super) fn execute(
        &self,
        entry: &RelEntry,
        plan: pg_sys::SPIPlanPtr,
        vals: &[(usize, &TupleValue)],
    ) -> u64 {
        usercontext::as_role(entry.run_as, || self.execute_here(entry, plan, vals))
    }

    pub(super) fn execute_here(
        &self,
        entry: &RelEntry,
        plan: pg_sys::SPIPlanPtr,
        vals: &[(usize, &TupleValue)],
    ) -> u64 {
        let mut datums: Vec<pg_sys::Datum> = Vec::with_capacity(vals.len());
        let mut nulls: Vec<c_char> = Vec::with_capacity(vals.len());
        let old_cxt = unsafe { pg_sys::MemoryContextSwitchTo(self.change_cxt.value()) };
        {
            for (i, v) in vals {
                let Some(Some(col)) = entry.dest.get(*i) else {
                    pgrx::error!(
                        "column \"{}\" of {}.{} has no destination column",
                        entry
                            .rel
                            .columns
                            .get(*i)
                            .map(|c| c.name.as_str())
                            .unwrap_or("?"),
                        entry.rel.namespace,
                        entry.rel.name
                    );
                };
                match v {
                    TupleValue::Null => {
                        datums.push(pg_sys::Datum::from(0));
                        nulls.push(b'n' as c_char);
                    }
                    TupleValue::Text(bytes) => {
                        let mut buf = Vec::with_capacity(bytes.len() + 1);
                        buf.extend_from_slice(bytes);
                        buf.push(0);
                        let d = unsafe {
                            pg_sys::OidInputFunctionCall(
                                col.input_fn,
                                buf.as_mut_ptr() as *mut c_char,
                                col.ioparam,
                                col.typmod,
                            )
                        };
                        datums.push(d);
                        nulls.push(b' ' as c_char);
                    }
                    TupleValue::Binary(_) => {
                        pgrx::error!("binary pgoutput values are not requested and not supported");
                    }
                    TupleValue::Unchanged => {
                        pgrx::error!("an unchanged TOAST value cannot be used as a key");
                    }
                }
            }
        }
        unsafe { pg_sys::MemoryContextSwitchTo(old_cxt) };
        let rc = unsafe {
            pg_sys::SPI_execute_plan(plan, datums.as_mut_ptr(), nulls.as_ptr(), false, 0)
        };
        if rc < 0 {
            pgrx::error!("SPI_execute_plan failed with code {rc}");
        }
        unsafe { pg_sys::SPI_processed }
    }
}
