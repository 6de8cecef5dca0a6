//! The key-package directory.

use spine_mls::Refusal;
use spine_mls::verifier::validate_key_package;
use spine_proto::groups::v1 as pb;
use spine_read_models::directory;
use spine_runtime::ids::{self, Kind, TenantId};
use spine_runtime::now_secs;
use spine_runtime::store::{Compare, Op, TenantStore, Txn};

use crate::error::{GroupsError, Result, invalid, mls, mls_refusal};
use crate::model::{self, Device, b64, json, parse, unb64};
use crate::{MAX_KEY_PACKAGE_LIFETIME_SECS, MAX_KEY_PACKAGES, Node};

/// Largest accepted key package.
const MAX_KEY_PACKAGE_BYTES: usize = 16 * 1024;
/// Most key packages per upload.
const MAX_UPLOAD: usize = 100;
/// Most targets per claim.
const MAX_TARGETS: usize = 32;

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredKp {
    kp: String,
    not_after: u64,
    /// The package's hash reference (hex).
    #[serde(default)]
    reference: String,
}

fn check(bytes: &[u8], me: &Device, registered: &[u8], last_resort: bool) -> Result<(String, StoredKp)> {
    let field = if last_resort { "last_resort" } else { "key_packages" };
    if bytes.is_empty() || bytes.len() > MAX_KEY_PACKAGE_BYTES {
        return Err(invalid(field, format!("1 to {MAX_KEY_PACKAGE_BYTES} bytes")));
    }
    let info = validate_key_package(bytes).map_err(mls(field))?;
    let refused = |r: Refusal, m: String| mls_refusal(field, r, m);
    if Device::of(&info.name) != *me {
        return Err(refused(Refusal::BadCredential, "the credential must name the calling device".into()));
    }
    if info.signature_key != registered {
        return Err(refused(Refusal::BadCredential, "the signature key is not the device's registered key".into()));
    }
    if info.last_resort != last_resort {
        let m = if last_resort { "not marked last-resort" } else { "marked last-resort" };
        return Err(refused(Refusal::Invalid, m.into()));
    }
    let now = now_secs().max(0) as u64;
    if info.not_after <= now || info.not_before > now + 300 {
        return Err(refused(Refusal::Lifetime, "outside its lifetime".into()));
    }
    if info.not_after - now > MAX_KEY_PACKAGE_LIFETIME_SECS {
        return Err(refused(
            Refusal::Lifetime,
            format!(
                "lifetime longer than {MAX_KEY_PACKAGE_LIFETIME_SECS} seconds (ServiceInfo.max_key_package_lifetime_seconds)"
            ),
        ));
    }
    Ok((info.reference.clone(), StoredKp { kp: b64(bytes), not_after: info.not_after, reference: info.reference }))
}

pub(crate) async fn registered_key(t: &TenantStore, d: &Device) -> Result<Vec<u8>> {
    let rec = directory::device(t, &d.account, &d.device).await?.ok_or(GroupsError::NotFound("device"))?;
    rec.public_key_bytes().ok_or_else(|| GroupsError::Internal("device key is not base64".into()))
}

pub(crate) async fn upload(
    node: &Node,
    t: &TenantStore,
    me: &Device,
    req: pb::UploadKeyPackagesRequest,
) -> Result<pb::KeyPackageCount> {
    if req.key_packages.len() > MAX_UPLOAD {
        return Err(invalid("key_packages", format!("at most {MAX_UPLOAD} per call")));
    }
    if req.key_packages.is_empty() && req.last_resort.is_empty() {
        return Err(invalid("key_packages", "nothing to upload"));
    }
    node.limits.check(crate::config::GroupsRate::KeyPackageUploads, &me.tenant, &me.account, 1.0)?;
    let key = node.own_key(t, me).await?;
    let mut fresh = std::collections::BTreeMap::new();
    for kp in &req.key_packages {
        let (reference, stored) = check(kp, me, &key, false)?;
        fresh.insert(reference, stored);
    }
    let last_resort = match req.last_resort.is_empty() {
        true => None,
        false => Some(check(&req.last_resort, me, &key, true)?.1),
    };
    let prefix = model::kp_prefix(&me.account, &me.device);
    let dkey = t.key(&directory::device_key(&me.account, &me.device));
    // A device's packages sit in MAX_KEY_PACKAGES numbered slots; each new
    // one takes a free slot on condition that it is still free, so
    // concurrent uploads can never hold more than the limit between them.
    for _ in 0..8 {
        let held = t.range_all(&prefix).await?;
        let mut used = std::collections::BTreeSet::new();
        let mut refs = std::collections::BTreeSet::new();
        for kv in &held {
            used.insert(t.relative(&kv.key).rsplit('/').next().unwrap_or_default().to_string());
            if let Ok(s) = parse::<StoredKp>(kv) {
                refs.insert(s.reference);
            }
        }
        let new: Vec<&StoredKp> = fresh.values().filter(|s| !refs.contains(&s.reference)).collect();
        if held.len() + new.len() > MAX_KEY_PACKAGES as usize {
            return Err(GroupsError::Limit(format!(
                "a device holds at most {MAX_KEY_PACKAGES} key packages ({} on file)",
                held.len()
            )));
        }
        let free = (0..MAX_KEY_PACKAGES).map(|i| format!("{i:03}")).filter(|slot| !used.contains(slot));
        let mut txn = Txn::new().when(Compare::Present(dkey.clone()));
        for (slot, stored) in free.zip(new) {
            let k = t.key(&format!("{prefix}{slot}"));
            txn = txn.when(Compare::Absent(k.clone())).then(Op::put(k, json(stored)));
        }
        if let Some(stored) = &last_resort {
            txn = txn.then(Op::put(t.key(&model::kpl_key(&me.account, &me.device)), json(stored)));
        }
        if t.txn(txn).await?.succeeded {
            return count(t, me).await;
        }
        // The device is gone, or a concurrent upload took a slot: see which.
        if t.get(&directory::device_key(&me.account, &me.device)).await?.is_none() {
            return Err(GroupsError::NotFound("device"));
        }
    }
    Err(GroupsError::Conflict)
}

/// A device's pool, as it asks for it to replenish (and after uploads):
/// also where the pool-depth metric is taken, at no extra cost.
pub(crate) async fn count(t: &TenantStore, me: &Device) -> Result<pb::KeyPackageCount> {
    let remaining = t.count(&model::kp_prefix(&me.account, &me.device)).await?;
    crate::metrics::metrics().pool_depth.record(remaining, &[]);
    Ok(pb::KeyPackageCount {
        remaining: remaining as u32,
        has_last_resort: t.get(&model::kpl_key(&me.account, &me.device)).await?.is_some(),
    })
}

/// Takes one package of a device: a single-use one (atomically: only one
/// claimer can delete it), else the last-resort one.
async fn take(t: &TenantStore, account: &str, device: &str) -> Result<Option<(Vec<u8>, bool)>> {
    let now = now_secs().max(0) as u64;
    for _ in 0..16 {
        let page = t.range(&model::kp_prefix(account, device), None, 8).await?;
        if page.kvs.is_empty() {
            break;
        }
        // Each delete is a compare-and-swap: a package another claimer
        // took first is skipped; an expired one is dropped on the way.
        for kv in page.kvs {
            let stored: StoredKp = parse(&kv)?;
            let out = t
                .txn(
                    Txn::new()
                        .when(Compare::ModRevision(kv.stored_key(), kv.mod_revision))
                        .then(Op::delete(kv.stored_key())),
                )
                .await?;
            if out.succeeded && stored.not_after > now {
                return Ok(Some((unb64(&stored.kp)?, false)));
            }
        }
    }
    if let Some(kv) = t.get(&model::kpl_key(account, device)).await? {
        let stored: StoredKp = parse(&kv)?;
        if stored.not_after > now {
            return Ok(Some((unb64(&stored.kp)?, true)));
        }
    }
    Ok(None)
}

pub(crate) async fn claim(
    node: &Node,
    t: &TenantStore,
    me: &Device,
    req: pb::ClaimKeyPackagesRequest,
) -> Result<pb::ClaimKeyPackagesResponse> {
    if req.targets.is_empty() || req.targets.len() > MAX_TARGETS {
        return Err(invalid("targets", format!("1 to {MAX_TARGETS} targets")));
    }
    node.limits.check(
        crate::config::GroupsRate::KeyPackageClaims,
        &me.tenant,
        &me.account,
        req.targets.len() as f64,
    )?;
    let sys = node.rt.system_store();
    // Resolve every target first: one malformed or unresolvable reference
    // fails the claim before any package is consumed. A target that does
    // not consent to being added by the caller (who_can_add_to_groups,
    // blocks, cross-app reach) gets exactly the answer of an account with
    // no package: nothing, so a refusal cannot be told from an absence.
    let mut resolved = Vec::new();
    for target in &req.targets {
        let (store, account, other_tenant) = match target.target.as_ref() {
            Some(pb::target::Target::AccountId(a)) => {
                let a =
                    ids::parse(Kind::Account, a).ok_or_else(|| invalid("targets.account_id", "not an account id"))?;
                (t.clone(), a.to_string(), false)
            }
            Some(pb::target::Target::Interop(r)) => {
                TenantId::parse(&r.tenant_id).ok_or_else(|| invalid("targets.interop.tenant_id", "not a tenant id"))?;
                ids::parse(Kind::InteropHandle, &r.handle)
                    .ok_or_else(|| invalid("targets.interop.handle", "not a handle"))?;
                match directory::resolve_handle(&sys, &r.handle, t.tenant()).await? {
                    Some((tenant, account)) if tenant.as_str() == r.tenant_id => (sys.tenant(&tenant), account, true),
                    _ => return Err(GroupsError::NotFound("target")),
                }
            }
            None => return Err(invalid("targets", "empty target")),
        };
        let own = !other_tenant && account == me.account;
        let consents = own || crate::delivery::may_add(node, &store, me, &account).await?;
        resolved.push((store, account, other_tenant, consents));
    }
    let mut out = Vec::new();
    for (i, (store, account, other_tenant, consents)) in resolved.iter().enumerate() {
        if !consents {
            crate::metrics::key_package("claim", "refused");
            continue;
        }
        for (device, _) in directory::devices(store, account).await? {
            match take(store, account, &device).await? {
                Some((kp, last_resort)) => {
                    crate::metrics::key_package("claim", if last_resort { "last_resort" } else { "single_use" });
                    out.push(pb::ClaimedKeyPackage {
                        target: i as u32,
                        // Another product's device ids are not handed out
                        // (the package's own credential is for the group
                        // the person agreed to be added to).
                        device_id: if *other_tenant { String::new() } else { device },
                        key_package: kp,
                        last_resort,
                    });
                }
                None => crate::metrics::key_package("claim", "none"),
            }
        }
    }
    Ok(pb::ClaimKeyPackagesResponse { key_packages: out })
}
