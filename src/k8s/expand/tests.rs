//! The expansion decision over typed k8s-openapi objects: a table of claim/PV states and what
//! the controller does about each, then the accounting it shares with provisioning.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolumeClaimCondition, PersistentVolumeClaimStatus};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::*;
use crate::k8s::crd::FusevolNode;
use crate::k8s::provision::tests::{claim, class, existing_pv, node, state, GI};
use crate::k8s::provision::{decide, pending_bytes, Decision};
use crate::size::format_bytes;

fn expandable() -> StorageClass {
    let mut c = class("WaitForFirstConsumer", &[("tier", "fast")]);
    c.allow_volume_expansion = Some(true);
    c
}

/// Claim `uid` Bound to `pvc-<uid>`, requesting `request` bytes with `status` bytes in its
/// status, and the given conditions.
fn bound(uid: &str, request: u64, status: u64, conditions: &[&str]) -> PersistentVolumeClaim {
    let mut c = claim(uid, &format_bytes(request), Some("n1"));
    if let Some(spec) = c.spec.as_mut() {
        spec.volume_name = Some(format!("pvc-{uid}"));
    }
    c.status = Some(PersistentVolumeClaimStatus {
        phase: Some("Bound".into()),
        capacity: Some(BTreeMap::from([(
            "storage".to_string(),
            Quantity(format_bytes(status)),
        )])),
        conditions: (!conditions.is_empty()).then(|| {
            conditions
                .iter()
                .map(|t| PersistentVolumeClaimCondition {
                    type_: t.to_string(),
                    status: "True".into(),
                    ..Default::default()
                })
                .collect()
        }),
        ..Default::default()
    });
    c
}

/// The PV of claim `uid` on n1/fast: capacity `capacity`, volume-spec quota `quota`, and the
/// agent's applied-quota annotation `applied`.
fn pv(uid: &str, capacity: u64, quota: u64, applied: Option<u64>) -> PersistentVolume {
    let mut pv = existing_pv("n1", "fast", capacity, uid);
    pv.metadata.resource_version = Some("7".into());
    let spec = pv_volume_spec(&pv)
        .and_then(Result::ok)
        .map(|s| VolumeSpec {
            quota_bytes: quota,
            ..s
        });
    let annotations = pv.metadata.annotations.get_or_insert_with(BTreeMap::new);
    if let Some(spec) = spec {
        annotations.insert(
            crate::k8s::ANNOTATION_VOLUME_SPEC.into(),
            spec.to_annotation(),
        );
    }
    if let Some(a) = applied {
        annotations.insert(ANNOTATION_APPLIED_QUOTA.into(), a.to_string());
    }
    pv
}

/// A one-line account of a decision, for the table.
fn summary(e: &Expansion) -> String {
    match e {
        Expansion::Idle => "idle".into(),
        Expansion::Grow {
            pv_name,
            from,
            to,
            spec,
            reservation,
            resource_version,
        } => {
            assert_eq!(spec.quota_bytes, *to, "the new spec carries the new quota");
            assert_eq!(
                reservation.bytes, *to,
                "the reservation is for the new size"
            );
            assert_eq!(
                resource_version.as_deref(),
                Some("7"),
                "guarded by the PV's version"
            );
            format!(
                "grow {pv_name} {}->{} on {}/{}",
                format_bytes(*from),
                format_bytes(*to),
                reservation.node,
                reservation.tier
            )
        }
        Expansion::WaitForAgent { pv_name, quota } => {
            format!("wait {pv_name} {}", format_bytes(*quota))
        }
        Expansion::Finish {
            pv_name,
            bytes,
            set_pv_capacity,
        } => format!(
            "finish {pv_name} {}{}",
            format_bytes(*bytes),
            if *set_pv_capacity { " +pv" } else { "" }
        ),
        Expansion::Refuse { message } => format!("refuse: {message}"),
        Expansion::Shrink { message } => format!("shrink: {message}"),
    }
}

#[test]
fn each_state_of_a_claim_and_its_pv_leads_to_one_step() {
    let nodes = [node("n1", &[("fast", 4 * GI)])];
    // (case, claim, PV of the claim, expected summary)
    let cases: Vec<(&str, PersistentVolumeClaim, PersistentVolume, &str)> = vec![
        (
            "has what it asks for",
            bound("u1", GI, GI, &[]),
            pv("u1", GI, GI, Some(GI)),
            "idle",
        ),
        (
            "grows by 1Gi with 3Gi free",
            bound("u1", 2 * GI, GI, &[]),
            pv("u1", GI, GI, None),
            "grow pvc-u1 1Gi->2Gi on n1/fast",
        ),
        (
            "grows to the whole tier",
            bound("u1", 4 * GI, GI, &[]),
            pv("u1", GI, GI, Some(GI)),
            "grow pvc-u1 1Gi->4Gi on n1/fast",
        ),
        (
            "cannot grow beyond the tier: names what is free",
            bound("u1", 5 * GI, GI, &[]),
            pv("u1", GI, GI, Some(GI)),
            "refuse: cannot grow PersistentVolume pvc-u1 from 1Gi to 5Gi: node n1 tier \"fast\": requested 4Gi, free 3Gi (total 4Gi, allocated 1Gi)",
        ),
        (
            "quota written, agent silent",
            bound("u1", 2 * GI, GI, &["Resizing"]),
            pv("u1", GI, 2 * GI, None),
            "wait pvc-u1 2Gi",
        ),
        (
            "agent still on the old quota",
            bound("u1", 2 * GI, GI, &["Resizing"]),
            pv("u1", GI, 2 * GI, Some(GI)),
            "wait pvc-u1 2Gi",
        ),
        (
            "agent applied it: PV capacity, then the claim",
            bound("u1", 2 * GI, GI, &["Resizing"]),
            pv("u1", GI, 2 * GI, Some(2 * GI)),
            "finish pvc-u1 2Gi +pv",
        ),
        (
            "PV capacity set, claim status not yet (a restart in between)",
            bound("u1", 2 * GI, GI, &["Resizing"]),
            pv("u1", 2 * GI, 2 * GI, Some(2 * GI)),
            "finish pvc-u1 2Gi",
        ),
        (
            "status set by a kubelet, a stale condition left",
            bound("u1", 2 * GI, 2 * GI, &["FileSystemResizePending"]),
            pv("u1", 2 * GI, 2 * GI, Some(2 * GI)),
            "finish pvc-u1 2Gi",
        ),
        (
            "request lowered below a pending grow: finishes at the PV's size",
            bound("u1", 3 * GI, GI, &["Resizing"]),
            pv("u1", GI, 4 * GI, Some(4 * GI)),
            "finish pvc-u1 4Gi +pv",
        ),
        (
            "asks for less than it has",
            bound("u1", GI, 2 * GI, &[]),
            pv("u1", 2 * GI, 2 * GI, Some(2 * GI)),
            "shrink: the claim requests 1Gi, less than the 2Gi it has: volumes cannot shrink; PersistentVolume pvc-u1 keeps its size",
        ),
    ];
    for (case, claim, pv, want) in cases {
        let pvs = [pv];
        let got = summary(&decide_expansion(
            &claim,
            &expandable(),
            &state(&nodes, &pvs, &[]),
        ));
        assert_eq!(got, want, "{case}");
    }
}

#[test]
fn only_bound_claims_of_fusevol_classes_with_their_own_pv_are_considered() {
    let nodes = [node("n1", &[("fast", 4 * GI)])];
    let grow = bound("u1", 2 * GI, GI, &[]);
    let pvs = [pv("u1", GI, GI, None)];
    let cluster = state(&nodes, &pvs, &[]);
    assert!(matches!(
        decide_expansion(&grow, &expandable(), &cluster),
        Expansion::Grow { .. }
    ));

    let mut other = expandable();
    other.provisioner = "example.com/other".into();
    let mut pending = grow.clone();
    if let Some(s) = pending.status.as_mut() {
        s.phase = Some("Pending".into());
    }
    let mut deleting = grow.clone();
    deleting.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
    let mut no_status_capacity = grow.clone();
    if let Some(s) = no_status_capacity.status.as_mut() {
        s.capacity = None;
    }
    let mut foreign_pv = pv("u1", GI, GI, None);
    if let Some(r) = foreign_pv.spec.as_mut().and_then(|s| s.claim_ref.as_mut()) {
        r.uid = Some("someone-else".into());
    }
    let foreign = [foreign_pv];
    for (case, claim, class, pvs) in [
        ("another provisioner", &grow, &other, &pvs[..]),
        ("not bound", &pending, &expandable(), &pvs[..]),
        ("being deleted", &deleting, &expandable(), &pvs[..]),
        (
            "no status.capacity yet",
            &no_status_capacity,
            &expandable(),
            &pvs[..],
        ),
        ("PV not cached", &grow, &expandable(), &[][..]),
        (
            "PV bound to another claim",
            &grow,
            &expandable(),
            &foreign[..],
        ),
    ] {
        let got = decide_expansion(claim, class, &state(&nodes, pvs, &[]));
        assert_eq!(got, Expansion::Idle, "{case}");
    }
}

#[test]
fn refusals_say_why_and_change_nothing() {
    let nodes = [node("n1", &[("fast", 4 * GI)])];
    let grow = bound("u1", 2 * GI, GI, &[]);
    let pvs = [pv("u1", GI, GI, None)];
    let refused = |class: &StorageClass, nodes: &[FusevolNode], pvs: &[PersistentVolume]| {
        match decide_expansion(&grow, class, &state(nodes, pvs, &[])) {
            Expansion::Refuse { message } => message,
            other => panic!("expected Refuse, got {other:?}"),
        }
    };
    let mut fixed = expandable();
    fixed.allow_volume_expansion = Some(false);
    assert!(refused(&fixed, &nodes, &pvs)
        .contains("StorageClass fusevol-fast does not allow volume expansion"));
    fixed.allow_volume_expansion = None;
    assert!(refused(&fixed, &nodes, &pvs).contains("allowVolumeExpansion: true"));

    let msg = refused(&expandable(), &[], &pvs);
    assert!(msg.contains("node n1 has no fusevol agent"), "{msg}");
    let other_tier = [node("n1", &[("slow", 4 * GI)])];
    let msg = refused(&expandable(), &other_tier, &pvs);
    assert!(msg.contains("no tier \"fast\" (its tiers: slow)"), "{msg}");

    let mut broken = pvs[0].clone();
    if let Some(a) = broken.metadata.annotations.as_mut() {
        a.insert(crate::k8s::ANNOTATION_VOLUME_SPEC.into(), "{".into());
    }
    let msg = refused(&expandable(), &nodes, &[broken]);
    assert!(msg.contains("bad volume-spec annotation"), "{msg}");
}

#[test]
fn a_grow_counts_other_claims_reservations_and_pvs_on_the_tier() {
    let nodes = [node("n1", &[("fast", 4 * GI)])];
    let grow = bound("u1", 3 * GI, GI, &[]);
    // Another PV of 1Gi and a claim being provisioned with 1Gi: 1Gi left, the growth is 2Gi.
    let pvs = [pv("u1", GI, GI, None), pv("u2", GI, GI, Some(GI))];
    let provisioning = Reservation {
        node: "n1".into(),
        tier: "fast".into(),
        bytes: GI,
        claim_uid: "u3".into(),
    };
    let got = decide_expansion(
        &grow,
        &expandable(),
        &state(&nodes, &pvs, std::slice::from_ref(&provisioning)),
    );
    let Expansion::Refuse { message } = got else {
        panic!("expected Refuse, got {got:?}");
    };
    assert!(
        message.contains("requested 2Gi, free 1Gi (total 4Gi, allocated 2Gi, reserved for claims being provisioned 1Gi)"),
        "{message}"
    );
    // The claim's own reservation (an earlier grow, to another size) is not counted against it.
    let own = Reservation {
        claim_uid: "u1".into(),
        bytes: 2 * GI,
        ..provisioning.clone()
    };
    let got = decide_expansion(&grow, &expandable(), &state(&nodes, &pvs, &[own]));
    assert!(
        matches!(got, Expansion::Grow { to, .. } if to == 3 * GI),
        "{got:?}"
    );
    // A grow to this very size is in flight (written, not cached yet): not written twice.
    let in_flight = Reservation {
        claim_uid: "u1".into(),
        bytes: 3 * GI,
        ..provisioning
    };
    let got = decide_expansion(&grow, &expandable(), &state(&nodes, &pvs, &[in_flight]));
    assert_eq!(
        got,
        Expansion::WaitForAgent {
            pv_name: "pvc-u1".into(),
            quota: 3 * GI
        }
    );
}

#[test]
fn a_grow_in_flight_holds_only_its_growth_until_the_pv_shows_it() {
    let nodes = [node("n1", &[("fast", 4 * GI)])];
    let growing = Reservation {
        node: "n1".into(),
        tier: "fast".into(),
        bytes: 3 * GI,
        claim_uid: "u1".into(),
    };
    let before = [pv("u1", GI, GI, Some(GI))];
    assert_eq!(pending_bytes(&growing, &before), 2 * GI, "the growth only");
    // The quota in the annotation counts as soon as it is cached, capacity or not.
    let after = [pv("u1", GI, 3 * GI, None)];
    assert_eq!(pending_bytes(&growing, &after), 0);
    assert_eq!(pv_capacity_bytes(&after[0]), Some(3 * GI));
    // A claim being provisioned next to the grow in flight sees 1Gi free, not 3Gi.
    let newcomer = claim("u9", "2Gi", Some("n1"));
    let decision = decide(
        &newcomer,
        &expandable(),
        &state(&nodes, &before, std::slice::from_ref(&growing)),
    );
    let Decision::Reschedule { message } = decision else {
        panic!("expected Reschedule, got {decision:?}");
    };
    assert!(message.contains("requested 2Gi, free 1Gi"), "{message}");
    // Without a PV at all the whole reservation counts (provisioning, as before).
    assert_eq!(pending_bytes(&growing, &[]), 3 * GI);
}
