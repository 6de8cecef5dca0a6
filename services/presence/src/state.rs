//! The presence an owner node holds in memory: devices' announcements per
//! account, the derived status, last-seen, and the watchers to tell.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use spine_proto::identity::v1::LastSeenGranularity;
use spine_proto::presence::v1::{LastSeen, PresenceState, Status};

use crate::outbox::Outbox;
use crate::visibility::{AccountKey, View};

/// At most one published change per account per this interval: a flapping
/// device cannot storm its watchers.
pub const COALESCE: Duration = Duration::from_millis(500);

struct Sub {
    watcher: AccountKey,
    target: u32,
    view: Option<View>,
    out: Outbox,
}

#[derive(Default)]
struct Entry {
    devices: HashMap<String, (Status, Instant)>,
    /// Unix seconds the account was last online (0: unknown to this node).
    last_online: i64,
    published: Option<Status>,
    last_publish: Option<Instant>,
    pending: bool,
    /// Watchers, by subscription id: adding and removing one costs the same
    /// however many watch the account.
    subs: HashMap<u64, Sub>,
    /// In an answered call, as the calls service's markers say.
    in_call: bool,
}

fn now_secs() -> i64 {
    spine_runtime::now_secs()
}

impl Entry {
    /// Whether the entry holds nothing worth keeping: no watcher, no
    /// device, no call, no last-seen, nothing pending. Such entries are
    /// dropped, so watching made-up ids leaves nothing behind.
    fn is_empty(&self) -> bool {
        self.subs.is_empty() && self.devices.is_empty() && !self.in_call && !self.pending && self.last_online == 0
    }

    fn derived(&self, now: Instant) -> Status {
        if self.in_call {
            return Status::InCall;
        }
        let live = self.devices.values().filter(|(_, exp)| *exp > now).map(|(s, _)| *s);
        live.max_by_key(|s| match s {
            Status::InCall => 3,
            Status::Online => 2,
            Status::Away => 1,
            _ => 0,
        })
        .unwrap_or(Status::Offline)
    }
}

/// What a watcher is shown of a status.
pub fn render(target: u32, status: Option<Status>, last_online: i64, view: Option<View>) -> PresenceState {
    let unavailable = PresenceState {
        target,
        status: Status::Unavailable as i32,
        last_seen: LastSeen::Hidden as i32,
        last_seen_at: None,
    };
    let (Some(view), Some(status)) = (view, status) else { return unavailable };
    let mut s = PresenceState { target, status: status as i32, last_seen: LastSeen::Hidden as i32, last_seen_at: None };
    if status == Status::Offline && last_online > 0 {
        let ago = now_secs() - last_online;
        match view.last_seen {
            LastSeenGranularity::Coarse => {
                s.last_seen = match ago {
                    a if a <= 3 * 86_400 => LastSeen::Recently,
                    a if a <= 7 * 86_400 => LastSeen::WithinWeek,
                    a if a <= 30 * 86_400 => LastSeen::WithinMonth,
                    _ => LastSeen::LongAgo,
                } as i32;
            }
            LastSeenGranularity::Hour | LastSeenGranularity::Exact => {
                let unit = if view.last_seen == LastSeenGranularity::Hour { 3600 } else { 60 };
                s.last_seen = LastSeen::At as i32;
                s.last_seen_at = Some(prost_types::Timestamp { seconds: last_online / unit * unit, nanos: 0 });
            }
            _ => {}
        }
    }
    s
}

/// Watch pairs: (watcher, target) -> the subscriptions sharing the pair.
pub type Pairs = HashMap<(AccountKey, AccountKey), Vec<u64>>;

fn add_pairs(out: &mut Pairs, target: &AccountKey, e: &Entry, watcher: Option<&AccountKey>) {
    for (id, s) in e.subs.iter().filter(|(_, s)| watcher.is_none_or(|w| &s.watcher == w)) {
        out.entry((s.watcher.clone(), target.clone())).or_default().push(*id);
    }
}

/// The owner's state.
pub struct Owner {
    accounts: Mutex<HashMap<AccountKey, Entry>>,
    next_sub: AtomicU64,
    consent_epoch: AtomicU64,
    me: Weak<Owner>,
}

impl Owner {
    pub fn new() -> Arc<Self> {
        Arc::new_cyclic(|me| Owner {
            accounts: Mutex::new(HashMap::new()),
            next_sub: AtomicU64::new(1),
            consent_epoch: AtomicU64::new(0),
            me: me.clone(),
        })
    }

    /// Records a device's announcement.
    pub fn announce(&self, account: AccountKey, device: String, status: Status, ttl: Duration) {
        let mut map = self.accounts.lock().expect("presence lock");
        let e = map.entry(account.clone()).or_default();
        e.devices.insert(device, (status, Instant::now() + ttl));
        self.settle(&account, e);
    }

    /// Sets whether the accounts in `in_call` are in a call, and that no
    /// other account is (a full read of the calls service's markers).
    pub fn replace_in_call(&self, in_call: &std::collections::HashSet<AccountKey>) {
        let mut map = self.accounts.lock().expect("presence lock");
        for a in in_call {
            map.entry(a.clone()).or_default();
        }
        let keys: Vec<AccountKey> = map.keys().cloned().collect();
        for k in keys {
            let e = map.get_mut(&k).expect("listed key");
            let now = in_call.contains(&k);
            if e.in_call != now {
                e.in_call = now;
                self.settle(&k, e);
            }
            if e.is_empty() {
                map.remove(&k);
            }
        }
    }

    /// Sets whether one account is in a call.
    pub fn set_in_call(&self, account: &AccountKey, in_call: bool) {
        let mut map = self.accounts.lock().expect("presence lock");
        let e = map.entry(account.clone()).or_default();
        if e.in_call != in_call {
            e.in_call = in_call;
            self.settle(account, e);
        }
        if e.is_empty() {
            map.remove(account);
        }
    }

    /// Forgets everything about an account (its deletion).
    pub fn forget(&self, account: &AccountKey) {
        let mut map = self.accounts.lock().expect("presence lock");
        if let Some(e) = map.get_mut(account) {
            e.devices.clear();
            e.last_online = 0;
            let subs = std::mem::take(&mut e.subs);
            for s in subs.values() {
                s.out.push(render(s.target, None, 0, None));
            }
            map.remove(account);
        }
    }

    /// The current state as `view` shows it; `None` if this node holds
    /// nothing for the account and may be missing announcements (it only
    /// just became the owner).
    pub fn current(
        &self,
        account: &AccountKey,
        target: u32,
        view: Option<View>,
        warming: bool,
    ) -> Option<PresenceState> {
        let map = self.accounts.lock().expect("presence lock");
        match map.get(account) {
            Some(e) if !e.devices.is_empty() || e.last_online > 0 || e.in_call => {
                Some(render(target, Some(e.derived(Instant::now())), e.last_online, view))
            }
            _ if warming => None,
            _ => Some(render(target, Some(Status::Offline), 0, view)),
        }
    }

    /// Adds a watcher; returns its id. The caller sends the current state.
    pub fn subscribe(
        &self,
        account: AccountKey,
        watcher: AccountKey,
        target: u32,
        view: Option<View>,
        out: Outbox,
    ) -> u64 {
        let id = self.next_sub.fetch_add(1, Ordering::Relaxed);
        let mut map = self.accounts.lock().expect("presence lock");
        map.entry(account).or_default().subs.insert(id, Sub { watcher, target, view, out });
        id
    }

    /// Removes a watcher; an account left with nothing is forgotten.
    pub fn unsubscribe(&self, account: &AccountKey, id: u64) {
        let mut map = self.accounts.lock().expect("presence lock");
        if let Some(e) = map.get_mut(account) {
            e.subs.remove(&id);
            if e.is_empty() {
                map.remove(account);
            }
        }
    }

    /// Every watch pair, by (watcher, target): each pair's view is computed
    /// once, whatever number of streams it has.
    pub fn watchers(&self) -> Pairs {
        let map = self.accounts.lock().expect("presence lock");
        let mut out = Pairs::new();
        for (k, e) in map.iter() {
            add_pairs(&mut out, k, e, None);
        }
        out
    }

    /// The watch pairs whose view may have changed because `changed`'s
    /// consent data did: the pairs watching it, and, when its settings
    /// changed (`as_watcher`), the pairs in which it watches (a reciprocal
    /// rule reads the watcher's own settings). The second costs a pass over
    /// this node's watches; settings change seldom.
    pub fn pairs_of(&self, changed: &AccountKey, as_watcher: bool) -> Pairs {
        let map = self.accounts.lock().expect("presence lock");
        let mut out = Pairs::new();
        if let Some(e) = map.get(changed) {
            add_pairs(&mut out, changed, e, None);
        }
        if as_watcher {
            for (k, e) in map.iter().filter(|(k, _)| *k != changed) {
                add_pairs(&mut out, k, e, Some(changed));
            }
        }
        out
    }

    /// Counts a batch of consent changes about to be reviewed. A watch
    /// that computed its view before such a batch and subscribed after
    /// [`pairs_of`](Self::pairs_of) ran computes it again.
    pub fn consent_changed(&self) {
        self.consent_epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Batches of consent changes seen so far.
    pub fn consent_epoch(&self) -> u64 {
        self.consent_epoch.load(Ordering::SeqCst)
    }

    /// Accounts held in memory (for tests of the bookkeeping).
    pub fn held(&self) -> usize {
        self.accounts.lock().expect("presence lock").len()
    }

    /// Applies a re-checked view; tells the watcher if what it sees changed.
    pub fn set_view(&self, account: &AccountKey, id: u64, view: Option<View>) {
        let mut map = self.accounts.lock().expect("presence lock");
        let Some(e) = map.get_mut(account) else { return };
        let status = e.published;
        let last = e.last_online;
        if let Some(s) = e.subs.get_mut(&id)
            && s.view != view
        {
            s.view = view;
            s.out.push(render(s.target, status.or(Some(Status::Offline)), last, view));
        }
    }

    /// Expires announcements whose TTL passed and publishes the changes.
    pub fn expire(&self) {
        let mut map = self.accounts.lock().expect("presence lock");
        let now = Instant::now();
        // In place: this runs four times a second over every account held,
        // most of them only watched, so it copies and hashes nothing.
        map.retain(|k, e| {
            let before = e.devices.len();
            e.devices.retain(|_, (_, exp)| *exp > now);
            if e.devices.len() != before || e.published.is_some_and(|p| p != e.derived(now)) {
                self.settle(k, e);
            }
            !e.is_empty()
        });
    }

    /// Publishes the derived status if it changed, at most once per
    /// [`COALESCE`]; a change inside the window goes out at its end.
    fn settle(&self, account: &AccountKey, e: &mut Entry) {
        let now = Instant::now();
        let status = e.derived(now);
        // Last online: now while online, and the moment it went offline.
        if status != Status::Offline || e.published.is_some_and(|p| p != Status::Offline) {
            e.last_online = now_secs();
        }
        if e.published == Some(status) {
            return;
        }
        match e.last_publish {
            Some(t) if now.duration_since(t) < COALESCE => {
                if !e.pending {
                    e.pending = true;
                    let wait = COALESCE - now.duration_since(t);
                    let (me, account) = (self.me.clone(), account.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(wait).await;
                        if let Some(owner) = me.upgrade() {
                            let mut map = owner.accounts.lock().expect("presence lock");
                            if let Some(e) = map.get_mut(&account) {
                                e.pending = false;
                                owner.settle(&account, e);
                            }
                        }
                    });
                }
            }
            _ => {
                e.published = Some(status);
                e.last_publish = Some(now);
                for s in e.subs.values() {
                    s.out.push(render(s.target, Some(status), e.last_online, s.view));
                }
            }
        }
    }

    /// This node's state of an account, for its data report.
    pub fn describe(&self, account: &AccountKey) -> Option<String> {
        let map = self.accounts.lock().expect("presence lock");
        map.get(account).map(|e| {
            format!(
                "status {:?}, {} announcing device(s), last online {}",
                e.derived(Instant::now()),
                e.devices.len(),
                e.last_online
            )
        })
    }
}
