//! A single-channel pipetting robot (OT-2 class). It keeps track of what is
//! on its deck, of every well's volume, of the tip it carries and of the
//! tips already used, and refuses what a real robot could not do.

use super::SimOptions;
use super::core::{Model, Sim, Step};
use super::sim_device;
use crate::catalogue::DeviceKind;
use crate::clock::Clock;
use crate::device::{DeckLabware, DeviceResult, LiquidHandler};
use crate::labware::LabwareDefinition;
use crate::units::trim;
use async_trait::async_trait;
use indexmap::IndexMap;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

const PICK_UP_TIP_S: f64 = 4.0;
const DROP_TIP_S: f64 = 3.0;
/// Gantry move to a well before each aspirate, dispense or mix.
const MOVE_S: f64 = 1.5;
/// Volumes are floating point: a well "holds" 100 uL if within this.
const VOLUME_EPSILON_UL: f64 = 1e-6;

/// Opentrons default flow rates (uL/s) by tip size: P20, P300, P1000.
fn flow_rate_ul_s(tip_capacity_ul: f64) -> f64 {
    if tip_capacity_ul <= 20.0 {
        7.6
    } else if tip_capacity_ul <= 300.0 {
        92.9
    } else {
        274.7
    }
}

#[derive(Clone)]
struct Placed {
    definition: Arc<LabwareDefinition>,
    slot: u32,
    /// µL per well; wells not listed are empty.
    volumes: HashMap<String, f64>,
    /// Tip rack wells whose tip has been taken.
    used_tips: HashSet<String>,
}

impl Placed {
    fn new(labware: &DeckLabware) -> Result<Self, String> {
        let mut volumes: HashMap<String, f64> = HashMap::new();
        for (well, volume) in &labware.contents {
            let Some(w) = labware.definition.well(well) else {
                return Err(format!("{} has no well {well}", labware.name));
            };
            if !(volume.is_finite() && *volume >= 0.0) {
                return Err(format!("{}:{well}: invalid volume {volume}", labware.name));
            }
            let total = volumes.get(well).copied().unwrap_or(0.0) + volume;
            if total > w.capacity_ul + VOLUME_EPSILON_UL {
                return Err(format!(
                    "{}:{well} holds {} uL, not {} uL",
                    labware.name,
                    trim(w.capacity_ul),
                    trim(total)
                ));
            }
            volumes.insert(well.clone(), total);
        }
        Ok(Placed {
            definition: Arc::clone(&labware.definition),
            slot: labware.slot,
            volumes,
            used_tips: HashSet::new(),
        })
    }
}

#[derive(Clone)]
struct Tip {
    rack: String,
    well: String,
    capacity_ul: f64,
    volume_ul: f64,
}

/// The deck bookkeeping of a liquid handler (labware, well volumes, tips),
/// shared by the simulated handler and the profile driver, which checks every
/// operation against it before anything moves.
#[derive(Clone, Default)]
pub(crate) struct LiquidHandlerModel {
    deck: IndexMap<String, Placed>,
    /// Labware taken off the deck keeps its contents until it comes back.
    off_deck: HashMap<String, Placed>,
    tip: Option<Tip>,
}

fn check_volume(volume_ul: f64) -> Result<(), String> {
    if volume_ul.is_finite() && volume_ul > 0.0 {
        Ok(())
    } else {
        Err(format!("invalid volume {volume_ul} uL"))
    }
}

impl LiquidHandlerModel {
    /// The deck as journal records.
    pub(crate) fn records(&self, device: &str) -> Vec<crate::runtime::events::LabwareRecord> {
        self.deck
            .iter()
            .map(|(name, p)| {
                let d = &p.definition;
                let mut tips_used: Vec<String> = p.used_tips.iter().cloned().collect();
                tips_used.sort_by_key(|w| d.wells.get_index_of(w));
                crate::runtime::events::LabwareRecord {
                    name: name.clone(),
                    device: device.to_string(),
                    slot: p.slot,
                    load_name: d.load_name.clone(),
                    rows: d.columns.first().map_or(0, |c| c.len() as u32),
                    columns: d.columns.len() as u32,
                    volumes_ul: p
                        .volumes
                        .iter()
                        .filter(|(_, v)| **v > 0.0)
                        .map(|(w, v)| (w.clone(), *v))
                        .collect(),
                    tips_used,
                }
            })
            .collect()
    }

    /// Slot and definition of labware on the deck.
    pub(crate) fn placed(&self, name: &str) -> Option<(u32, &LabwareDefinition)> {
        self.deck.get(name).map(|p| (p.slot, p.definition.as_ref()))
    }

    /// µL in the tip that is on, if one is.
    pub(crate) fn tip_volume_ul(&self) -> Option<f64> {
        self.tip.as_ref().map(|t| t.volume_ul)
    }

    fn labware(&self, name: &str) -> Result<&Placed, String> {
        self.deck
            .get(name)
            .ok_or_else(|| format!("{name} is not on the deck"))
    }

    /// The capacity of `labware:well`, which must be a liquid well on the deck.
    fn liquid_well(&self, labware: &str, well: &str) -> Result<f64, String> {
        let placed = self.labware(labware)?;
        if placed.definition.is_tiprack {
            return Err(format!("{labware} is a tip rack"));
        }
        placed
            .definition
            .well(well)
            .map(|w| w.capacity_ul)
            .ok_or_else(|| format!("{labware} has no well {well}"))
    }

    fn volume(&self, labware: &str, well: &str) -> f64 {
        self.deck
            .get(labware)
            .and_then(|p| p.volumes.get(well))
            .copied()
            .unwrap_or(0.0)
    }

    fn set_volume(&mut self, labware: &str, well: &str, volume_ul: f64) {
        if let Some(p) = self.deck.get_mut(labware) {
            p.volumes.insert(well.to_string(), volume_ul.max(0.0));
        }
    }

    pub(crate) fn configure(&mut self, deck: &[DeckLabware]) -> Result<Step, String> {
        let mut placed = IndexMap::new();
        for labware in deck {
            if placed.contains_key(&labware.name) {
                return Err(format!("{} is on the deck twice", labware.name));
            }
            placed.insert(labware.name.clone(), Placed::new(labware)?);
        }
        // A new run: the deck is what it says. The tip on the head (if any)
        // is physical and stays.
        self.deck = placed;
        self.off_deck.clear();
        Ok(Step::new(0.0, format!("configure_deck {}", deck.len())))
    }

    pub(crate) fn pick_up_tip(&mut self, rack: &str, well: &str) -> Result<Step, String> {
        if let Some(tip) = &self.tip {
            return Err(format!("a tip ({}:{}) is already on", tip.rack, tip.well));
        }
        let placed = self.labware(rack)?;
        if !placed.definition.is_tiprack {
            return Err(format!("{rack} is not a tip rack"));
        }
        let capacity_ul = placed
            .definition
            .well(well)
            .map(|w| w.capacity_ul)
            .ok_or_else(|| format!("{rack} has no well {well}"))?;
        if placed.used_tips.contains(well) {
            return Err(format!("the tip at {rack}:{well} was used already"));
        }
        if let Some(p) = self.deck.get_mut(rack) {
            p.used_tips.insert(well.to_string());
        }
        self.tip = Some(Tip {
            rack: rack.to_string(),
            well: well.to_string(),
            capacity_ul,
            volume_ul: 0.0,
        });
        Ok(Step::new(
            PICK_UP_TIP_S,
            format!("pick_up_tip {rack}:{well}"),
        ))
    }

    pub(crate) fn aspirate(
        &mut self,
        labware: &str,
        well: &str,
        volume_ul: f64,
    ) -> Result<Step, String> {
        check_volume(volume_ul)?;
        self.liquid_well(labware, well)?;
        let Some(tip) = &self.tip else {
            return Err("no tip on".into());
        };
        let held = self.volume(labware, well);
        if volume_ul > held + VOLUME_EPSILON_UL {
            return Err(format!(
                "{labware}:{well} holds {} uL, cannot aspirate {} uL",
                trim(held),
                trim(volume_ul)
            ));
        }
        let room = tip.capacity_ul - tip.volume_ul;
        if volume_ul > room + VOLUME_EPSILON_UL {
            return Err(format!(
                "the tip has room for {} uL, not {} uL",
                trim(room),
                trim(volume_ul)
            ));
        }
        let seconds = MOVE_S + volume_ul / flow_rate_ul_s(tip.capacity_ul);
        self.set_volume(labware, well, held - volume_ul);
        if let Some(tip) = &mut self.tip {
            tip.volume_ul += volume_ul;
        }
        Ok(Step::new(
            seconds,
            format!("aspirate {labware}:{well} {}", trim(volume_ul)),
        ))
    }

    pub(crate) fn dispense(
        &mut self,
        labware: &str,
        well: &str,
        volume_ul: f64,
    ) -> Result<Step, String> {
        check_volume(volume_ul)?;
        let capacity = self.liquid_well(labware, well)?;
        let Some(tip) = &self.tip else {
            return Err("no tip on".into());
        };
        if volume_ul > tip.volume_ul + VOLUME_EPSILON_UL {
            return Err(format!(
                "the tip holds {} uL, cannot dispense {} uL",
                trim(tip.volume_ul),
                trim(volume_ul)
            ));
        }
        let held = self.volume(labware, well);
        if held + volume_ul > capacity + VOLUME_EPSILON_UL {
            return Err(format!(
                "{labware}:{well} holds {} of {} uL, {} uL more would overflow",
                trim(held),
                trim(capacity),
                trim(volume_ul)
            ));
        }
        let seconds = MOVE_S + volume_ul / flow_rate_ul_s(tip.capacity_ul);
        self.set_volume(labware, well, held + volume_ul);
        if let Some(tip) = &mut self.tip {
            tip.volume_ul = (tip.volume_ul - volume_ul).max(0.0);
        }
        Ok(Step::new(
            seconds,
            format!("dispense {labware}:{well} {}", trim(volume_ul)),
        ))
    }

    pub(crate) fn mix(
        &mut self,
        labware: &str,
        well: &str,
        volume_ul: f64,
        cycles: u32,
    ) -> Result<Step, String> {
        check_volume(volume_ul)?;
        if cycles == 0 {
            return Err("mix needs at least one cycle".into());
        }
        self.liquid_well(labware, well)?;
        let Some(tip) = &self.tip else {
            return Err("no tip on".into());
        };
        let held = self.volume(labware, well);
        if volume_ul > held + VOLUME_EPSILON_UL {
            return Err(format!(
                "{labware}:{well} holds {} uL, cannot mix {} uL",
                trim(held),
                trim(volume_ul)
            ));
        }
        if tip.volume_ul + volume_ul > tip.capacity_ul + VOLUME_EPSILON_UL {
            return Err(format!(
                "the tip has room for {} uL, cannot mix {} uL",
                trim(tip.capacity_ul - tip.volume_ul),
                trim(volume_ul)
            ));
        }
        let seconds =
            MOVE_S + f64::from(cycles) * 2.0 * volume_ul / flow_rate_ul_s(tip.capacity_ul);
        Ok(Step::new(
            seconds,
            format!("mix {labware}:{well} {} x{cycles}", trim(volume_ul)),
        ))
    }

    pub(crate) fn drop_tip(&mut self) -> Result<Step, String> {
        // Whatever is left in the tip goes to the trash with it.
        self.tip.take().ok_or("no tip to drop")?;
        Ok(Step::new(DROP_TIP_S, "drop_tip"))
    }

    pub(crate) fn remove(&mut self, labware: &str) -> Result<Step, String> {
        let placed = self
            .deck
            .shift_remove(labware)
            .ok_or_else(|| format!("{labware} is not on the deck"))?;
        self.off_deck.insert(labware.to_string(), placed);
        Ok(Step::new(0.0, format!("remove_labware {labware}")))
    }

    pub(crate) fn place(&mut self, labware: &DeckLabware) -> Result<Step, String> {
        if self.deck.contains_key(&labware.name) {
            return Err(format!("{} is already on the deck", labware.name));
        }
        // Labware that left this deck comes back as it left: the handler's own
        // record of its wells wins over the declared contents.
        let known = self.off_deck.remove(&labware.name);
        let mut placed = match known {
            Some(p) => p,
            None => Placed::new(labware)?,
        };
        placed.slot = labware.slot;
        placed.definition = Arc::clone(&labware.definition);
        self.off_deck.remove(&labware.name);
        self.deck.insert(labware.name.clone(), placed);
        Ok(Step::new(
            0.0,
            format!("place_labware {} {}", labware.name, labware.slot),
        ))
    }
}

impl Model for LiquidHandlerModel {
    const KIND: DeviceKind = DeviceKind::LiquidHandler;

    fn command(&mut self, name: &str, _now: f64) -> Result<f64, String> {
        match name {
            "drop_tip" => self.drop_tip().map(|s| s.seconds),
            other => Err(format!("{other} is not supported")),
        }
    }
}

/// A simulated single-channel liquid handler with 12 deck slots.
pub struct SimLiquidHandler {
    sim: Sim<LiquidHandlerModel>,
}

impl SimLiquidHandler {
    pub fn new(id: impl Into<String>, clock: Clock, options: SimOptions) -> Self {
        // Pipetting has nothing that ramps: Instant timing only skips the waits.
        let model = LiquidHandlerModel {
            deck: IndexMap::new(),
            off_deck: HashMap::new(),
            tip: None,
        };
        SimLiquidHandler {
            sim: Sim::new(id.into(), clock, &options, model),
        }
    }

    /// The volume in `labware:well` (µL), if the labware is on the deck and
    /// has that well.
    pub fn volume(&self, labware: &str, well: &str) -> Option<f64> {
        self.sim.with_model(|m, _| {
            let placed = m.deck.get(labware)?;
            placed.definition.well(well)?;
            Some(placed.volumes.get(well).copied().unwrap_or(0.0))
        })
    }

    /// The liquid in the tip on the head (µL), or `None` without a tip.
    pub fn tip_volume(&self) -> Option<f64> {
        self.sim
            .with_model(|m, _| m.tip.as_ref().map(|t| t.volume_ul))
    }

    /// The labware on the deck and its slot, in the order placed.
    pub fn deck(&self) -> Vec<(String, u32)> {
        self.sim.with_model(|m, _| {
            m.deck
                .iter()
                .map(|(name, p)| (name.clone(), p.slot))
                .collect()
        })
    }
}

sim_device!(SimLiquidHandler, LiquidHandlerModel);

#[async_trait]
impl LiquidHandler for SimLiquidHandler {
    fn deck_state(&self) -> crate::device::DeckState {
        crate::device::DeckState(self.sim.with_model(|m, _| m.clone()))
    }

    async fn restore_deck(&self, deck: crate::device::DeckState) -> DeviceResult<()> {
        self.sim.with_model(|m, _| *m = deck.0);
        Ok(())
    }

    async fn configure_deck(&self, deck: Vec<DeckLabware>) -> DeviceResult<()> {
        // Run setup, not an operation: injected `FailNext` failures are kept
        // for the run's first real operation.
        self.sim.setup(|m, _| m.configure(&deck))
    }

    async fn pick_up_tip(&self, rack: &str, well: &str) -> DeviceResult<()> {
        self.sim.op(|m, _| m.pick_up_tip(rack, well)).await
    }

    async fn aspirate(&self, labware: &str, well: &str, volume_ul: f64) -> DeviceResult<()> {
        self.sim
            .op(|m, _| m.aspirate(labware, well, volume_ul))
            .await
    }

    async fn dispense(&self, labware: &str, well: &str, volume_ul: f64) -> DeviceResult<()> {
        self.sim
            .op(|m, _| m.dispense(labware, well, volume_ul))
            .await
    }

    async fn mix(
        &self,
        labware: &str,
        well: &str,
        volume_ul: f64,
        cycles: u32,
    ) -> DeviceResult<()> {
        self.sim
            .op(|m, _| m.mix(labware, well, volume_ul, cycles))
            .await
    }

    async fn drop_tip(&self) -> DeviceResult<()> {
        self.sim.op(|m, _| m.drop_tip()).await
    }

    async fn remove_labware(&self, labware: &str) -> DeviceResult<()> {
        self.sim.op(|m, _| m.remove(labware)).await
    }

    async fn place_labware(&self, labware: DeckLabware) -> DeviceResult<()> {
        self.sim.op(|m, _| m.place(&labware)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Device, DeviceError};
    use crate::labware::builtin::builtin;
    use crate::sim::SimTiming;
    use crate::sim::{FaultKind, Injectable, InjectedFault};

    fn labware(name: &str, load_name: &str, slot: u32, contents: &[(&str, f64)]) -> DeckLabware {
        DeckLabware {
            name: name.to_string(),
            definition: Arc::new(builtin(load_name).unwrap().clone()),
            slot,
            contents: contents.iter().map(|(w, v)| (w.to_string(), *v)).collect(),
        }
    }

    fn deck() -> Vec<DeckLabware> {
        vec![
            labware("tips", "opentrons_96_tiprack_300ul", 1, &[]),
            labware("small", "opentrons_96_tiprack_20ul", 3, &[]),
            labware(
                "plate",
                "corning_96_wellplate_360ul_flat",
                2,
                &[("A1", 200.0), ("B1", 350.0)],
            ),
        ]
    }

    async fn handler(clock: Clock) -> SimLiquidHandler {
        let lh = SimLiquidHandler::new("liquid_handler", clock, SimOptions::default());
        lh.configure_deck(deck()).await.unwrap();
        lh
    }

    fn refused(r: DeviceResult<()>) -> String {
        match r {
            Err(DeviceError::Refused { reason, .. }) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refuses_each_impossible_operation() {
        let clock = Clock::new(1.0);
        let lh = handler(clock).await;
        let ops = lh.operations();
        // Without a tip.
        assert!(refused(lh.aspirate("plate", "A1", 10.0).await).contains("no tip"));
        assert!(refused(lh.dispense("plate", "A2", 10.0).await).contains("no tip"));
        assert!(refused(lh.mix("plate", "A1", 10.0, 3).await).contains("no tip"));
        assert!(refused(lh.drop_tip().await).contains("no tip"));
        assert!(refused(lh.command("drop_tip").await).contains("no tip"));
        // Tips must come from a tip rack on the deck, in a well that exists.
        assert!(refused(lh.pick_up_tip("plate", "A1").await).contains("not a tip rack"));
        assert!(refused(lh.pick_up_tip("ghost", "A1").await).contains("not on the deck"));
        assert!(refused(lh.pick_up_tip("tips", "Z99").await).contains("no well"));
        assert_eq!(lh.operations(), ops, "nothing was done");

        lh.pick_up_tip("tips", "A1").await.unwrap();
        assert!(refused(lh.pick_up_tip("tips", "B1").await).contains("already on"));
        // More than the well holds; more than the tip holds (300 uL).
        assert!(refused(lh.aspirate("plate", "A1", 201.0).await).contains("holds 200"));
        assert!(refused(lh.aspirate("plate", "C1", 1.0).await).contains("holds 0"));
        assert!(refused(lh.aspirate("plate", "B1", 301.0).await).contains("room for 300"));
        assert!(refused(lh.aspirate("ghost", "A1", 1.0).await).contains("not on the deck"));
        assert!(refused(lh.aspirate("tips", "B1", 1.0).await).contains("tip rack"));
        assert!(refused(lh.aspirate("plate", "A1", -5.0).await).contains("invalid volume"));
        assert!(refused(lh.mix("plate", "A1", 250.0, 2).await).contains("holds 200"));
        assert!(refused(lh.mix("plate", "A1", 50.0, 0).await).contains("cycle"));
        // More than the tip holds; past the well's capacity (360 uL).
        lh.aspirate("plate", "A1", 100.0).await.unwrap();
        assert!(refused(lh.dispense("plate", "A2", 100.5).await).contains("tip holds 100"));
        assert!(refused(lh.dispense("plate", "B1", 20.0).await).contains("overflow"));
        assert!(refused(lh.dispense("plate", "A2", 300.0).await).contains("tip holds"));
        // A used tip cannot be picked up again.
        lh.drop_tip().await.unwrap();
        assert!(refused(lh.pick_up_tip("tips", "A1").await).contains("used already"));
        // Labware off the deck.
        lh.remove_labware("plate").await.unwrap();
        lh.pick_up_tip("tips", "B1").await.unwrap();
        assert!(refused(lh.aspirate("plate", "A1", 10.0).await).contains("not on the deck"));
        assert!(refused(lh.remove_labware("plate").await).contains("not on the deck"));
        assert!(refused(lh.command("pick_up_tip").await).contains("not a command"));

        // The refusals changed nothing: A1 lost exactly the 100 uL aspirated.
        lh.place_labware(labware("plate", "corning_96_wellplate_360ul_flat", 5, &[]))
            .await
            .unwrap();
        assert_eq!(lh.volume("plate", "A1"), Some(100.0));
        assert_eq!(lh.volume("plate", "B1"), Some(350.0));
        assert_eq!(lh.deck().last(), Some(&("plate".to_string(), 5)));
        assert!(
            refused(
                lh.place_labware(labware("plate", "corning_96_wellplate_360ul_flat", 6, &[]))
                    .await
            )
            .contains("already on the deck")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_correct_sequence_takes_the_documented_time_and_moves_liquid() {
        let clock = Clock::new(1.0);
        let lh = handler(clock).await;
        let start = clock.now_s();
        lh.pick_up_tip("tips", "A1").await.unwrap();
        lh.aspirate("plate", "A1", 150.0).await.unwrap();
        lh.dispense("plate", "A2", 100.0).await.unwrap();
        lh.dispense("plate", "A3", 50.0).await.unwrap();
        lh.mix("plate", "A2", 50.0, 3).await.unwrap();
        lh.drop_tip().await.unwrap();
        lh.pick_up_tip("small", "A1").await.unwrap();
        lh.aspirate("plate", "B1", 20.0).await.unwrap();
        assert!(refused(lh.aspirate("plate", "B1", 1.0).await).contains("room for 0"));
        lh.dispense("plate", "A3", 20.0).await.unwrap();
        lh.command("drop_tip").await.unwrap();
        let elapsed = clock.now_s() - start;
        let p300 = 92.9;
        let p20 = 7.6;
        let expected = 4.0
            + (1.5 + 150.0 / p300)
            + (1.5 + 100.0 / p300)
            + (1.5 + 50.0 / p300)
            + (1.5 + 3.0 * 2.0 * 50.0 / p300)
            + 3.0
            + 4.0
            + (1.5 + 20.0 / p20) * 2.0
            + 3.0;
        assert!((elapsed - expected).abs() < 0.01, "{elapsed} vs {expected}");
        assert_eq!(lh.volume("plate", "A1"), Some(50.0));
        assert_eq!(lh.volume("plate", "A2"), Some(100.0));
        assert_eq!(lh.volume("plate", "A3"), Some(70.0));
        assert_eq!(lh.volume("plate", "B1"), Some(330.0));
        assert_eq!(lh.tip_volume(), None);
        assert_eq!(
            lh.log(),
            [
                "configure_deck 3",
                "pick_up_tip tips:A1",
                "aspirate plate:A1 150",
                "dispense plate:A2 100",
                "dispense plate:A3 50",
                "mix plate:A2 50 x3",
                "drop_tip",
                "pick_up_tip small:A1",
                "aspirate plate:B1 20",
                "dispense plate:A3 20",
                "drop_tip",
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn configure_deck_refuses_bad_contents_and_ignores_fail_next() {
        let clock = Clock::new(1.0);
        let lh = SimLiquidHandler::new("lh", clock, SimOptions::default());
        let overfull = labware("p", "corning_96_wellplate_360ul_flat", 1, &[("A1", 400.0)]);
        assert!(lh.configure_deck(vec![overfull]).await.is_err());
        let no_well = labware("p", "corning_96_wellplate_360ul_flat", 1, &[("Z1", 1.0)]);
        assert!(lh.configure_deck(vec![no_well]).await.is_err());
        let twice = vec![
            labware("p", "corning_96_wellplate_360ul_flat", 1, &[]),
            labware("p", "corning_96_wellplate_360ul_flat", 2, &[]),
        ];
        assert!(lh.configure_deck(twice).await.is_err());

        lh.inject(InjectedFault::FailNext {
            count: 1,
            error: FaultKind::Refused,
        });
        lh.configure_deck(deck()).await.unwrap();
        assert!(
            lh.pick_up_tip("tips", "A1").await.is_err(),
            "the injected failure"
        );
        lh.pick_up_tip("tips", "A1").await.unwrap();
        assert_eq!(lh.log(), ["configure_deck 3", "pick_up_tip tips:A1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn instant_timing_takes_no_lab_time() {
        let clock = Clock::new(1.0);
        let options = SimOptions {
            seed: 0,
            timing: SimTiming::Instant,
        };
        let lh = SimLiquidHandler::new("lh", clock, options);
        lh.configure_deck(deck()).await.unwrap();
        lh.pick_up_tip("tips", "A1").await.unwrap();
        lh.aspirate("plate", "A1", 100.0).await.unwrap();
        lh.mix("plate", "A1", 50.0, 10).await.unwrap();
        lh.dispense("plate", "A2", 100.0).await.unwrap();
        lh.drop_tip().await.unwrap();
        assert_eq!(clock.now_s(), 0.0);
        assert_eq!(lh.volume("plate", "A2"), Some(100.0));
    }
}
