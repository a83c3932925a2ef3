//! Labware definitions compiled into the program.
//!
//! Each definition is generated from a handful of published manufacturer
//! figures (grid pitch, position of A1, well depth, diameter and volume)
//! rather than listed well by well, so a wrong figure is one edit away from
//! fixed. Figures marked "uncertain" could not be confirmed against the
//! manufacturer's drawing; check them with a calibration run before relying
//! on them to the tenth of a millimetre.
//!
//! Manufacturers give A1's position as offsets from the labware's left and
//! back (row A) edges; the generator converts that to the Opentrons frame,
//! where y runs from the front edge.

use super::{Dimensions, LabwareDefinition, Well, WellShape, row_label};
use indexmap::IndexMap;
use std::collections::BTreeMap;
use std::sync::LazyLock;

/// ANSI/SLAS 1-2004 footprint length (x).
pub const SBS_X_MM: f64 = 127.76;
/// ANSI/SLAS 1-2004 footprint width (y).
pub const SBS_Y_MM: f64 = 85.48;

/// The built-in definition with this load name.
pub fn builtin(load_name: &str) -> Option<&'static LabwareDefinition> {
    BUILTINS.get(load_name)
}

/// Load names of all built-in definitions, sorted.
pub fn builtin_names() -> &'static [&'static str] {
    &NAMES
}

static BUILTINS: LazyLock<BTreeMap<&'static str, LabwareDefinition>> = LazyLock::new(|| {
    SPECS
        .iter()
        .map(|spec| (spec.load_name, spec.generate()))
        .collect()
});

static NAMES: LazyLock<Vec<&'static str>> = LazyLock::new(|| BUILTINS.keys().copied().collect());

/// A regular grid of identical wells on an SBS footprint.
struct GridSpec {
    load_name: &'static str,
    display_name: &'static str,
    brand: &'static str,
    height_mm: f64,
    rows: usize,
    columns: usize,
    /// A1 centre from the left edge (manufacturers' "A1 column offset").
    a1_from_left_mm: f64,
    /// A1 centre from the back edge (manufacturers' "A1 row offset").
    a1_from_back_mm: f64,
    pitch_x_mm: f64,
    pitch_y_mm: f64,
    well: WellSpec,
    tip_length_mm: Option<f64>,
}

/// What every well of a [`GridSpec`] shares.
#[derive(Clone, Copy)]
struct WellSpec {
    /// Well bottom above the labware's bottom; for tip racks, where the tip's
    /// end would be if it were pushed fully into the slot (height - tip length).
    bottom_z_mm: f64,
    depth_mm: f64,
    capacity_ul: f64,
    shape: WellShape,
}

impl GridSpec {
    fn generate(&self) -> LabwareDefinition {
        let mut wells = IndexMap::with_capacity(self.rows * self.columns);
        let mut columns = Vec::with_capacity(self.columns);
        for col in 0..self.columns {
            let mut column = Vec::with_capacity(self.rows);
            for row in 0..self.rows {
                let name = format!("{}{}", row_label(row), col + 1);
                let well = Well {
                    name: name.clone(),
                    x_mm: round_mm(self.a1_from_left_mm + col as f64 * self.pitch_x_mm),
                    y_mm: round_mm(SBS_Y_MM - self.a1_from_back_mm - row as f64 * self.pitch_y_mm),
                    z_mm: round_mm(self.well.bottom_z_mm),
                    depth_mm: self.well.depth_mm,
                    capacity_ul: self.well.capacity_ul,
                    shape: self.well.shape,
                };
                wells.insert(name.clone(), well);
                column.push(name);
            }
            columns.push(column);
        }
        LabwareDefinition {
            load_name: self.load_name.to_string(),
            display_name: self.display_name.to_string(),
            brand: self.brand.to_string(),
            is_tiprack: self.tip_length_mm.is_some(),
            tip_length_mm: self.tip_length_mm,
            dimensions: Dimensions {
                x_mm: SBS_X_MM,
                y_mm: SBS_Y_MM,
                z_mm: self.height_mm,
            },
            columns,
            wells,
        }
    }
}

/// Rounds to 0.01 mm so that `14.38 + 11 * 9.0` reads 113.38, not 113.38000000000001.
fn round_mm(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

const fn circular(diameter_mm: f64) -> WellShape {
    WellShape::Circular { diameter_mm }
}

const fn rectangular(x_mm: f64, y_mm: f64) -> WellShape {
    WellShape::Rectangular { x_mm, y_mm }
}

/// A 96-position (8 x 12, 9 mm pitch) layout with A1 at the SBS standard
/// offsets of 14.38 mm from the left and 11.24 mm from the back edge.
const fn sbs_96(
    load_name: &'static str,
    display_name: &'static str,
    brand: &'static str,
    height_mm: f64,
    well: WellSpec,
) -> GridSpec {
    GridSpec {
        load_name,
        display_name,
        brand,
        height_mm,
        rows: 8,
        columns: 12,
        a1_from_left_mm: 14.38,
        a1_from_back_mm: 11.24,
        pitch_x_mm: 9.0,
        pitch_y_mm: 9.0,
        well,
        tip_length_mm: None,
    }
}

/// An Opentrons 96 tip rack: the tip's top sits at the rack's top, so the
/// slot's "bottom" is the rack height minus the tip length.
const fn tip_rack_96(
    load_name: &'static str,
    display_name: &'static str,
    height_mm: f64,
    tip_length_mm: f64,
    tip_diameter_mm: f64,
    capacity_ul: f64,
) -> GridSpec {
    let mut spec = sbs_96(
        load_name,
        display_name,
        "Opentrons",
        height_mm,
        WellSpec {
            bottom_z_mm: height_mm - tip_length_mm,
            depth_mm: tip_length_mm,
            capacity_ul,
            shape: circular(tip_diameter_mm),
        },
    );
    spec.tip_length_mm = Some(tip_length_mm);
    spec
}

const SPECS: &[GridSpec] = &[
    // Corning 3650 and the standard-volume 96 well flat bottom plates sharing
    // its body (Corning 96 well microplate dimension drawing): height 14.22,
    // A1 offsets 14.38/11.24, pitch 9.0, well depth 10.67, total well volume
    // 360 µL. Diameter 6.86 is uncertain: the wells taper slightly (about
    // 6.9 at the top, 6.4 at the bottom) and this is the upper part.
    sbs_96(
        "corning_96_wellplate_360ul_flat",
        "Corning 96 Well Plate 360 µL Flat",
        "Corning",
        14.22,
        WellSpec {
            bottom_z_mm: 14.22 - 10.67,
            depth_mm: 10.67,
            capacity_ul: 360.0,
            shape: circular(6.86),
        },
    ),
    // Bio-Rad Hard-Shell HSP96xx (e.g. HSP9601, 96-well full skirt) product
    // dimensions: height 16.06, SBS A1 offsets, pitch 9.0, max well volume
    // 200 µL. Well depth 14.81 and top inner diameter 5.46 are uncertain.
    sbs_96(
        "biorad_96_wellplate_200ul_pcr",
        "Bio-Rad 96 Well Plate 200 µL PCR",
        "Bio-Rad",
        16.06,
        WellSpec {
            bottom_z_mm: 16.06 - 14.81,
            depth_mm: 14.81,
            capacity_ul: 200.0,
            shape: circular(5.46),
        },
    ),
    // NEST 503001 "96 Deep Well Plate 2 mL" (catalogue number uncertain):
    // height 41, square wells 8.2 x 8.2 at the top, depth 38, SBS A1 offsets,
    // 9.0 pitch, 2 mL per well. The 3 mm floor (bottom z) is uncertain.
    sbs_96(
        "nest_96_wellplate_2ml_deep",
        "NEST 96 Deep Well Plate 2 mL",
        "NEST",
        41.0,
        WellSpec {
            bottom_z_mm: 3.0,
            depth_mm: 38.0,
            capacity_ul: 2000.0,
            shape: rectangular(8.2, 8.2),
        },
    ),
    // NEST 402501 "96-Well PCR Plate 0.1 mL, full skirt": height 15.7, well
    // depth 14.78, top inner diameter 5.34, 100 µL. Bottom z 0.92 is
    // uncertain (height minus depth).
    sbs_96(
        "nest_96_wellplate_100ul_pcr_full_skirt",
        "NEST 96 Well Plate 100 µL PCR Full Skirt",
        "NEST",
        15.7,
        WellSpec {
            bottom_z_mm: 15.7 - 14.78,
            depth_mm: 14.78,
            capacity_ul: 100.0,
            shape: circular(5.34),
        },
    ),
    // Corning 384 well flat bottom microplates, standard volume (e.g. 3640;
    // which catalogue numbers share this body is uncertain), Corning 384 well
    // dimension drawing: height 14.22, A1 column offset 12.13, row offset
    // 8.99, pitch 4.5, square wells 3.63 x 3.63 at the top (uncertain), depth
    // 11.43, total well volume 112 µL.
    GridSpec {
        load_name: "corning_384_wellplate_112ul_flat",
        display_name: "Corning 384 Well Plate 112 µL Flat",
        brand: "Corning",
        height_mm: 14.22,
        rows: 16,
        columns: 24,
        a1_from_left_mm: 12.13,
        a1_from_back_mm: 8.99,
        pitch_x_mm: 4.5,
        pitch_y_mm: 4.5,
        well: WellSpec {
            bottom_z_mm: 14.22 - 11.43,
            depth_mm: 11.43,
            capacity_ul: 112.0,
            shape: rectangular(3.63, 3.63),
        },
        tip_length_mm: None,
    },
    // Corning 3516 "6 Well Cell Culture Plate": height 20.27 without lid,
    // A1 column offset 24.76, row offset 23.16, pitch 39.12, well diameter
    // 35.43, depth 17.4, 16.8 mL per well. Offsets uncertain (±0.2 mm).
    GridSpec {
        load_name: "corning_6_wellplate_16.8ml_flat",
        display_name: "Corning 6 Well Plate 16.8 mL Flat",
        brand: "Corning",
        height_mm: 20.27,
        rows: 2,
        columns: 3,
        a1_from_left_mm: 24.76,
        a1_from_back_mm: 23.16,
        pitch_x_mm: 39.12,
        pitch_y_mm: 39.12,
        well: WellSpec {
            bottom_z_mm: 20.27 - 17.4,
            depth_mm: 17.4,
            capacity_ul: 16_800.0,
            shape: circular(35.43),
        },
        tip_length_mm: None,
    },
    // Corning 3526 "24 Well Cell Culture Plate": height 20.27, pitch 19.3,
    // well diameter 16.26, depth 17.4, 3.4 mL per well. A1 offsets 17.53 and
    // 13.78 are uncertain (grid taken as centred on the footprint in y).
    GridSpec {
        load_name: "corning_24_wellplate_3.4ml_flat",
        display_name: "Corning 24 Well Plate 3.4 mL Flat",
        brand: "Corning",
        height_mm: 20.27,
        rows: 4,
        columns: 6,
        a1_from_left_mm: 17.53,
        a1_from_back_mm: 13.78,
        pitch_x_mm: 19.3,
        pitch_y_mm: 19.3,
        well: WellSpec {
            bottom_z_mm: 20.27 - 17.4,
            depth_mm: 17.4,
            capacity_ul: 3400.0,
            shape: circular(16.26),
        },
        tip_length_mm: None,
    },
    // NEST 360102 "12 Well Reservoir 15 mL": height 31.4, 12 channels of
    // 8.2 x 71.2 mm on a 9 mm pitch, first channel centre 14.38 from the left,
    // channels centred front to back, 26.85 deep, 15 mL each. Bottom z 4.55
    // is uncertain.
    GridSpec {
        load_name: "nest_12_reservoir_15ml",
        display_name: "NEST 12 Well Reservoir 15 mL",
        brand: "NEST",
        height_mm: 31.4,
        rows: 1,
        columns: 12,
        a1_from_left_mm: 14.38,
        a1_from_back_mm: SBS_Y_MM / 2.0,
        pitch_x_mm: 9.0,
        pitch_y_mm: 9.0,
        well: WellSpec {
            bottom_z_mm: 4.55,
            depth_mm: 26.85,
            capacity_ul: 15_000.0,
            shape: rectangular(8.2, 71.2),
        },
        tip_length_mm: None,
    },
    // NEST 360103 "1 Well Reservoir 195 mL": height 31.4, one trough of
    // 106.8 x 71.2 mm centred on the footprint, 25 deep, 195 mL. Bottom z 4.55
    // is uncertain.
    GridSpec {
        load_name: "nest_1_reservoir_195ml",
        display_name: "NEST 1 Well Reservoir 195 mL",
        brand: "NEST",
        height_mm: 31.4,
        rows: 1,
        columns: 1,
        a1_from_left_mm: SBS_X_MM / 2.0,
        a1_from_back_mm: SBS_Y_MM / 2.0,
        pitch_x_mm: 0.0,
        pitch_y_mm: 0.0,
        well: WellSpec {
            bottom_z_mm: 4.55,
            depth_mm: 25.0,
            capacity_ul: 195_000.0,
            shape: rectangular(106.8, 71.2),
        },
        tip_length_mm: None,
    },
    // Opentrons 4-in-1 tube rack set, 24-tube insert, holding Eppendorf
    // Safe-Lock 1.5 mL tubes (Eppendorf 0030120086). Rack height 79.85, A1
    // centre 18.21 from the left and 10.05 from the back, pitch 19.28 both
    // ways. Tube: inner diameter 8.7 at the top, 37.8 deep, 1.5 mL. The rack
    // offsets and the tube's inner diameter are uncertain.
    GridSpec {
        load_name: "opentrons_24_tuberack_eppendorf_1.5ml_safelock_snapcap",
        display_name: "Opentrons 24 Tube Rack with Eppendorf 1.5 mL Safe-Lock Snapcap",
        brand: "Opentrons",
        height_mm: 79.85,
        rows: 4,
        columns: 6,
        a1_from_left_mm: 18.21,
        a1_from_back_mm: 10.05,
        pitch_x_mm: 19.28,
        pitch_y_mm: 19.28,
        well: WellSpec {
            bottom_z_mm: 79.85 - 37.8,
            depth_mm: 37.8,
            capacity_ul: 1500.0,
            shape: circular(8.7),
        },
        tip_length_mm: None,
    },
    // Opentrons OT-2 tip racks (Opentrons' published tip and rack dimensions
    // for 20 µL, 300 µL and 1000 µL tips): rack height and tip length. The
    // tip opening diameters are uncertain.
    tip_rack_96(
        "opentrons_96_tiprack_20ul",
        "Opentrons 96 Tip Rack 20 µL",
        64.69,
        39.2,
        3.27,
        20.0,
    ),
    tip_rack_96(
        "opentrons_96_tiprack_300ul",
        "Opentrons 96 Tip Rack 300 µL",
        64.49,
        59.3,
        5.23,
        300.0,
    ),
    tip_rack_96(
        "opentrons_96_tiprack_1000ul",
        "Opentrons 96 Tip Rack 1000 µL",
        97.47,
        88.0,
        7.62,
        1000.0,
    ),
    // Filter tips: rack height 66.9 and tip length 58.35 are uncertain.
    tip_rack_96(
        "opentrons_96_filtertiprack_200ul",
        "Opentrons 96 Filter Tip Rack 200 µL",
        66.9,
        58.35,
        5.59,
        200.0,
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    struct Expected {
        name: &'static str,
        wells: usize,
        rows: usize,
        columns: usize,
        last: &'static str,
        a1_xy: (f64, f64),
        last_xy: (f64, f64),
        capacity_ul: f64,
        tip_length_mm: Option<f64>,
    }

    const EXPECTED: &[Expected] = &[
        Expected {
            name: "corning_96_wellplate_360ul_flat",
            wells: 96,
            rows: 8,
            columns: 12,
            last: "H12",
            a1_xy: (14.38, 74.24),
            last_xy: (113.38, 11.24),
            capacity_ul: 360.0,
            tip_length_mm: None,
        },
        Expected {
            name: "biorad_96_wellplate_200ul_pcr",
            wells: 96,
            rows: 8,
            columns: 12,
            last: "H12",
            a1_xy: (14.38, 74.24),
            last_xy: (113.38, 11.24),
            capacity_ul: 200.0,
            tip_length_mm: None,
        },
        Expected {
            name: "nest_96_wellplate_2ml_deep",
            wells: 96,
            rows: 8,
            columns: 12,
            last: "H12",
            a1_xy: (14.38, 74.24),
            last_xy: (113.38, 11.24),
            capacity_ul: 2000.0,
            tip_length_mm: None,
        },
        Expected {
            name: "nest_96_wellplate_100ul_pcr_full_skirt",
            wells: 96,
            rows: 8,
            columns: 12,
            last: "H12",
            a1_xy: (14.38, 74.24),
            last_xy: (113.38, 11.24),
            capacity_ul: 100.0,
            tip_length_mm: None,
        },
        Expected {
            name: "corning_384_wellplate_112ul_flat",
            wells: 384,
            rows: 16,
            columns: 24,
            last: "P24",
            a1_xy: (12.13, 76.49),
            last_xy: (115.63, 8.99),
            capacity_ul: 112.0,
            tip_length_mm: None,
        },
        Expected {
            name: "corning_6_wellplate_16.8ml_flat",
            wells: 6,
            rows: 2,
            columns: 3,
            last: "B3",
            a1_xy: (24.76, 62.32),
            last_xy: (103.0, 23.2),
            capacity_ul: 16_800.0,
            tip_length_mm: None,
        },
        Expected {
            name: "corning_24_wellplate_3.4ml_flat",
            wells: 24,
            rows: 4,
            columns: 6,
            last: "D6",
            a1_xy: (17.53, 71.7),
            last_xy: (114.03, 13.8),
            capacity_ul: 3400.0,
            tip_length_mm: None,
        },
        Expected {
            name: "nest_12_reservoir_15ml",
            wells: 12,
            rows: 1,
            columns: 12,
            last: "A12",
            a1_xy: (14.38, 42.74),
            last_xy: (113.38, 42.74),
            capacity_ul: 15_000.0,
            tip_length_mm: None,
        },
        Expected {
            name: "nest_1_reservoir_195ml",
            wells: 1,
            rows: 1,
            columns: 1,
            last: "A1",
            a1_xy: (63.88, 42.74),
            last_xy: (63.88, 42.74),
            capacity_ul: 195_000.0,
            tip_length_mm: None,
        },
        Expected {
            name: "opentrons_24_tuberack_eppendorf_1.5ml_safelock_snapcap",
            wells: 24,
            rows: 4,
            columns: 6,
            last: "D6",
            a1_xy: (18.21, 75.43),
            last_xy: (114.61, 17.59),
            capacity_ul: 1500.0,
            tip_length_mm: None,
        },
        Expected {
            name: "opentrons_96_tiprack_20ul",
            wells: 96,
            rows: 8,
            columns: 12,
            last: "H12",
            a1_xy: (14.38, 74.24),
            last_xy: (113.38, 11.24),
            capacity_ul: 20.0,
            tip_length_mm: Some(39.2),
        },
        Expected {
            name: "opentrons_96_tiprack_300ul",
            wells: 96,
            rows: 8,
            columns: 12,
            last: "H12",
            a1_xy: (14.38, 74.24),
            last_xy: (113.38, 11.24),
            capacity_ul: 300.0,
            tip_length_mm: Some(59.3),
        },
        Expected {
            name: "opentrons_96_tiprack_1000ul",
            wells: 96,
            rows: 8,
            columns: 12,
            last: "H12",
            a1_xy: (14.38, 74.24),
            last_xy: (113.38, 11.24),
            capacity_ul: 1000.0,
            tip_length_mm: Some(88.0),
        },
        Expected {
            name: "opentrons_96_filtertiprack_200ul",
            wells: 96,
            rows: 8,
            columns: 12,
            last: "H12",
            a1_xy: (14.38, 74.24),
            last_xy: (113.38, 11.24),
            capacity_ul: 200.0,
            tip_length_mm: Some(58.35),
        },
    ];

    fn get(name: &str) -> &'static LabwareDefinition {
        builtin(name).unwrap_or_else(|| panic!("no built-in {name}"))
    }

    #[test]
    fn every_builtin_has_the_expected_grid() {
        for e in EXPECTED {
            let d = get(e.name);
            assert_eq!(d.load_name, e.name);
            assert_eq!(d.wells.len(), e.wells, "{}", e.name);
            assert_eq!(d.row_count(), e.rows, "{}", e.name);
            assert_eq!(d.column_count(), e.columns, "{}", e.name);
            assert_eq!(d.columns.len(), e.columns, "{}", e.name);
            let a1 = d.well("A1").unwrap();
            assert_eq!((a1.x_mm, a1.y_mm), e.a1_xy, "{} A1", e.name);
            let last = d.well(e.last).unwrap();
            assert_eq!((last.x_mm, last.y_mm), e.last_xy, "{} {}", e.name, e.last);
            assert_eq!(d.well_at(e.rows - 1, e.columns - 1), Some(last));
            assert_eq!(d.grid_position(e.last), Some((e.rows - 1, e.columns - 1)));
            assert_eq!(d.wells_in_order().last(), Some(last));
            assert_eq!(d.max_capacity_ul(), e.capacity_ul, "{}", e.name);
            assert!(d.wells.values().all(|w| w.capacity_ul == e.capacity_ul));
            assert_eq!(d.is_tiprack, e.tip_length_mm.is_some(), "{}", e.name);
            assert_eq!(d.tip_length_mm, e.tip_length_mm, "{}", e.name);
        }
        assert_eq!(builtin_names().len(), EXPECTED.len());
    }

    #[test]
    fn wells_in_order_walk_down_columns() {
        for name in builtin_names() {
            let d = get(name);
            let order: Vec<&str> = d.wells_in_order().map(|w| w.name.as_str()).collect();
            assert_eq!(order.len(), d.wells.len(), "{name}");
            assert_eq!(order[0], "A1", "{name}");
            let expected_second = if d.row_count() > 1 { "B1" } else { "A2" };
            if order.len() > 1 {
                assert_eq!(order[1], expected_second, "{name}");
            }
            // The map's own order matches the ordering, too.
            assert!(d.wells.keys().map(String::as_str).eq(order.iter().copied()));
        }
        let p96 = get("corning_96_wellplate_360ul_flat");
        let order: Vec<&str> = p96
            .wells_in_order()
            .map(|w| w.name.as_str())
            .take(10)
            .collect();
        assert_eq!(
            order,
            ["A1", "B1", "C1", "D1", "E1", "F1", "G1", "H1", "A2", "B2"]
        );
    }

    #[test]
    fn size_descriptions() {
        assert_eq!(
            get("corning_96_wellplate_360ul_flat").size_description(),
            "96 wells, rows A-H, columns 1-12"
        );
        assert_eq!(
            get("corning_384_wellplate_112ul_flat").size_description(),
            "384 wells, rows A-P, columns 1-24"
        );
        assert_eq!(
            get("nest_12_reservoir_15ml").size_description(),
            "12 wells, row A, columns 1-12"
        );
        assert_eq!(
            get("nest_1_reservoir_195ml").size_description(),
            "1 well (A1)"
        );
    }

    /// Catches a mistyped figure: every well must lie within the footprint and
    /// below the top, and neighbouring wells must not overlap.
    #[test]
    fn geometry_is_physically_plausible() {
        for name in builtin_names() {
            let d = get(name);
            assert_eq!((d.dimensions.x_mm, d.dimensions.y_mm), (SBS_X_MM, SBS_Y_MM));
            for w in d.wells.values() {
                let (half_x, half_y) = match w.shape {
                    WellShape::Circular { diameter_mm } => (diameter_mm / 2.0, diameter_mm / 2.0),
                    WellShape::Rectangular { x_mm, y_mm } => (x_mm / 2.0, y_mm / 2.0),
                };
                assert!(
                    w.x_mm - half_x > 0.0 && w.x_mm + half_x < SBS_X_MM,
                    "{name} {}",
                    w.name
                );
                assert!(
                    w.y_mm - half_y > 0.0 && w.y_mm + half_y < SBS_Y_MM,
                    "{name} {}",
                    w.name
                );
                assert!(w.z_mm >= 0.0, "{name} {}", w.name);
                assert!(
                    w.z_mm + w.depth_mm <= d.dimensions.z_mm + 1e-9,
                    "{name} {}",
                    w.name
                );
                assert!(w.depth_mm > 0.0 && w.capacity_ul > 0.0);
            }
            if let (Some(a1), Some(a2)) = (d.well("A1"), d.well("A2")) {
                let width = match a1.shape {
                    WellShape::Circular { diameter_mm } => diameter_mm,
                    WellShape::Rectangular { x_mm, .. } => x_mm,
                };
                assert!(a2.x_mm - a1.x_mm > width, "{name}: wells overlap");
            }
            if let Some(tip_length) = d.tip_length_mm {
                assert!(d.wells.values().all(|w| w.depth_mm == tip_length));
            }
        }
    }

    #[test]
    fn names_are_sorted_and_resolve() {
        let names = builtin_names();
        assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
        for name in names {
            assert_eq!(get(name).load_name, *name);
        }
        assert!(builtin("Corning_96_wellplate_360ul_flat").is_none());
        assert!(builtin("").is_none());
    }

    #[test]
    fn tip_racks_are_flagged() {
        let racks: Vec<&str> = builtin_names()
            .iter()
            .copied()
            .filter(|n| get(n).is_tiprack)
            .collect();
        assert_eq!(
            racks,
            [
                "opentrons_96_filtertiprack_200ul",
                "opentrons_96_tiprack_1000ul",
                "opentrons_96_tiprack_20ul",
                "opentrons_96_tiprack_300ul",
            ]
        );
    }
}
