//! Labware definitions: plates, reservoirs, tube racks and tip racks.
//!
//! Geometry follows the Opentrons conventions so that definitions from the
//! Opentrons labware library can be used unchanged: all lengths are in mm,
//! measured from the labware's front-left-bottom corner (x to the right, y
//! towards the back, z up). Row A is at the back, so its y is the largest.
//!
//! [`builtin`] holds definitions compiled into the program and [`opentrons`]
//! loads Opentrons labware schema 2 JSON files.

pub mod builtin;
pub mod opentrons;

use indexmap::IndexMap;
use serde::Serialize;
use std::collections::BTreeSet;

/// One kind of labware: its outline and the wells (or tip slots) in it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabwareDefinition {
    pub load_name: String,
    pub display_name: String,
    pub brand: String,
    pub is_tiprack: bool,
    /// Length of one tip, for tip racks.
    pub tip_length_mm: Option<f64>,
    /// Footprint (x, y) and height (z).
    pub dimensions: Dimensions,
    /// Opentrons "ordering": columns left to right, each listing its wells
    /// from the top (back) row to the bottom (front) row.
    pub columns: Vec<Vec<String>>,
    /// Wells by name, in `columns` order.
    pub wells: IndexMap<String, Well>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Dimensions {
    pub x_mm: f64,
    pub y_mm: f64,
    pub z_mm: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Well {
    pub name: String,
    /// Centre of the well's opening, from the labware's left edge.
    pub x_mm: f64,
    /// Centre of the well's opening, from the labware's front edge.
    pub y_mm: f64,
    /// Bottom of the well, from the labware's bottom.
    pub z_mm: f64,
    pub depth_mm: f64,
    /// Total liquid volume; for a tip rack, the capacity of one tip.
    pub capacity_ul: f64,
    pub shape: WellShape,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum WellShape {
    Circular { diameter_mm: f64 },
    Rectangular { x_mm: f64, y_mm: f64 },
}

impl LabwareDefinition {
    /// The well with exactly this name (case-sensitive: "A1", not "a1").
    pub fn well(&self, name: &str) -> Option<&Well> {
        self.wells.get(name)
    }

    /// Number of distinct rows among the wells with grid names ("A1", "AB12").
    ///
    /// Wells with other names are not part of the grid. A grid with gaps (rows A
    /// and C only) counts its rows, not the span: 2 here.
    pub fn row_count(&self) -> usize {
        self.grid_cells()
            .map(|(row, _)| row)
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// Number of distinct columns among the wells with grid names.
    pub fn column_count(&self) -> usize {
        self.grid_cells()
            .map(|(_, col)| col)
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// The well at a 0-based grid position: row 0 is "A", column 0 is "1".
    pub fn well_at(&self, row: usize, column: usize) -> Option<&Well> {
        let number = column.checked_add(1)?;
        self.wells.get(&format!("{}{number}", row_label(row)))
    }

    /// The 0-based (row, column) of a well, if its name is a grid name.
    pub fn grid_position(&self, name: &str) -> Option<(usize, usize)> {
        if self.wells.contains_key(name) {
            parse_well_name(name)
        } else {
            None
        }
    }

    /// Wells column by column, each from top to bottom: A1, B1, ..., H1, A2, ...
    pub fn wells_in_order(&self) -> impl Iterator<Item = &Well> {
        self.columns
            .iter()
            .flatten()
            .filter_map(|name| self.wells.get(name))
    }

    /// Largest well capacity in µL (0 for labware without wells).
    pub fn max_capacity_ul(&self) -> f64 {
        self.wells
            .values()
            .map(|w| w.capacity_ul)
            .fold(0.0, f64::max)
    }

    /// A short phrase for messages: "96 wells, rows A-H, columns 1-12",
    /// "12 wells, row A, columns 1-12" or "1 well (A1)".
    pub fn size_description(&self) -> String {
        let count = self.wells.len();
        if count == 1 {
            let name = self.wells.keys().next().map_or("", String::as_str);
            return format!("1 well ({name})");
        }
        let mut text = format!("{count} wells");
        let cells: Vec<(usize, usize)> = self.grid_cells().collect();
        if cells.is_empty() {
            if count > 0 {
                text.push_str(", not in a row/column grid");
            }
            return text;
        }
        let rows: BTreeSet<usize> = cells.iter().map(|&(row, _)| row).collect();
        let columns: BTreeSet<usize> = cells.iter().map(|&(_, col)| col).collect();
        text.push_str(", ");
        text.push_str(&describe_set("row", &rows, row_label));
        text.push_str(", ");
        text.push_str(&describe_set("column", &columns, |c| (c + 1).to_string()));
        let off_grid = count.saturating_sub(cells.len());
        if off_grid > 0 {
            text.push_str(&format!(", and {off_grid} off the grid"));
        }
        text
    }

    /// Grid positions of the wells, in `columns` order.
    fn grid_cells(&self) -> impl Iterator<Item = (usize, usize)> {
        self.wells_in_order()
            .filter_map(|w| parse_well_name(&w.name))
    }
}

/// "row A", "rows A-H" for a run without gaps, "rows A, C and E" otherwise.
fn describe_set(noun: &str, set: &BTreeSet<usize>, label: impl Fn(usize) -> String) -> String {
    let (Some(&first), Some(&last)) = (set.first(), set.last()) else {
        return format!("no {noun}s");
    };
    if set.len() == 1 {
        format!("{noun} {}", label(first))
    } else if last - first + 1 == set.len() {
        format!("{noun}s {}-{}", label(first), label(last))
    } else {
        let mut labels: Vec<String> = set.iter().map(|&i| label(i)).collect();
        let final_label = labels.pop().unwrap_or_default();
        format!("{noun}s {} and {final_label}", labels.join(", "))
    }
}

/// Longest row label accepted: three letters already give 18,278 rows.
const MAX_ROW_LETTERS: usize = 3;
/// Longest column number accepted (99,999 columns).
const MAX_COLUMN_DIGITS: usize = 5;

/// Splits a grid well name into its 0-based (row, column): "A1" is (0, 0),
/// "P24" is (15, 23), "AA1" is (26, 0).
///
/// Only canonical names count: upper-case letters, then a column number from 1
/// without leading zeros. "a1", "A01", "A0" and "Trough" are not grid names.
pub fn parse_well_name(name: &str) -> Option<(usize, usize)> {
    let letters = name.bytes().take_while(u8::is_ascii_uppercase).count();
    let (row_part, column_part) = name.split_at(letters);
    if letters == 0
        || letters > MAX_ROW_LETTERS
        || column_part.is_empty()
        || column_part.len() > MAX_COLUMN_DIGITS
        || column_part.starts_with('0')
        || !column_part.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let column: usize = column_part.parse().ok()?;
    // Bijective base 26: A=1 ... Z=26, AA=27.
    let row = row_part
        .bytes()
        .fold(0usize, |acc, b| acc * 26 + usize::from(b - b'A') + 1);
    Some((row - 1, column - 1))
}

/// The letters of a 0-based row: 0 is "A", 25 is "Z", 26 is "AA".
pub fn row_label(row: usize) -> String {
    let mut letters = Vec::new();
    let mut n = row as u128 + 1;
    while n > 0 {
        n -= 1;
        // n % 26 < 26, so the cast cannot truncate.
        letters.push(char::from(b'A' + (n % 26) as u8));
        n /= 26;
    }
    letters.iter().rev().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn well(name: &str, capacity_ul: f64) -> Well {
        Well {
            name: name.to_string(),
            x_mm: 10.0,
            y_mm: 10.0,
            z_mm: 1.0,
            depth_mm: 5.0,
            capacity_ul,
            shape: WellShape::Circular { diameter_mm: 3.0 },
        }
    }

    fn definition(columns: &[&[&str]]) -> LabwareDefinition {
        let columns: Vec<Vec<String>> = columns
            .iter()
            .map(|c| c.iter().map(|s| s.to_string()).collect())
            .collect();
        let wells = columns
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, n)| (n.clone(), well(n, 10.0 + i as f64)))
            .collect();
        LabwareDefinition {
            load_name: "test".into(),
            display_name: "Test".into(),
            brand: "Test".into(),
            is_tiprack: false,
            tip_length_mm: None,
            dimensions: Dimensions {
                x_mm: 127.76,
                y_mm: 85.48,
                z_mm: 10.0,
            },
            columns,
            wells,
        }
    }

    #[test]
    fn well_names_parse_to_grid_positions() {
        assert_eq!(parse_well_name("A1"), Some((0, 0)));
        assert_eq!(parse_well_name("H12"), Some((7, 11)));
        assert_eq!(parse_well_name("P24"), Some((15, 23)));
        assert_eq!(parse_well_name("Z1"), Some((25, 0)));
        assert_eq!(parse_well_name("AA1"), Some((26, 0)));
        assert_eq!(parse_well_name("AF48"), Some((31, 47)));
        for bad in [
            "", "A", "1", "a1", "A0", "A01", "A1x", "A-1", "Trough", "AAAA1", "A123456", "É1",
        ] {
            assert_eq!(parse_well_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn row_labels_are_bijective_base_26() {
        assert_eq!(row_label(0), "A");
        assert_eq!(row_label(25), "Z");
        assert_eq!(row_label(26), "AA");
        assert_eq!(row_label(51), "AZ");
        assert_eq!(row_label(52), "BA");
        assert_eq!(row_label(701), "ZZ");
        assert_eq!(row_label(702), "AAA");
        for row in 0..2000 {
            assert_eq!(
                parse_well_name(&format!("{}1", row_label(row))),
                Some((row, 0))
            );
        }
        // Never panics, even far outside any real plate.
        assert!(!row_label(usize::MAX).is_empty());
    }

    #[test]
    fn grid_queries() {
        let d = definition(&[&["A1", "B1"], &["A2", "B2"], &["A3", "B3"]]);
        assert_eq!(d.row_count(), 2);
        assert_eq!(d.column_count(), 3);
        assert_eq!(d.well_at(1, 2).map(|w| w.name.as_str()), Some("B3"));
        assert_eq!(d.well_at(2, 0), None);
        assert_eq!(d.well_at(0, usize::MAX), None);
        assert_eq!(d.grid_position("B3"), Some((1, 2)));
        assert_eq!(d.grid_position("C1"), None);
        assert_eq!(d.well("b3"), None);
        let order: Vec<&str> = d.wells_in_order().map(|w| w.name.as_str()).collect();
        assert_eq!(order, ["A1", "B1", "A2", "B2", "A3", "B3"]);
        assert_eq!(d.max_capacity_ul(), 15.0);
        assert_eq!(d.size_description(), "6 wells, rows A-B, columns 1-3");
    }

    #[test]
    fn size_descriptions() {
        let row: Vec<String> = (1..=12).map(|c| format!("A{c}")).collect();
        let row: Vec<&str> = row.iter().map(String::as_str).collect();
        let columns: Vec<&[&str]> = row.chunks(1).collect();
        assert_eq!(
            definition(&columns).size_description(),
            "12 wells, row A, columns 1-12"
        );
        assert_eq!(definition(&[&["A1"]]).size_description(), "1 well (A1)");
        assert_eq!(
            definition(&[&["A1", "B1", "C1", "D1"]]).size_description(),
            "4 wells, rows A-D, column 1"
        );
        assert_eq!(
            definition(&[&["A1", "C1"], &["A3", "C3"]]).size_description(),
            "4 wells, rows A and C, columns 1 and 3"
        );
        assert_eq!(
            definition(&[&["left", "right"]]).size_description(),
            "2 wells, not in a row/column grid"
        );
        assert_eq!(
            definition(&[&["A1", "B1"], &["waste"]]).size_description(),
            "3 wells, rows A-B, column 1, and 1 off the grid"
        );
        assert_eq!(definition(&[]).size_description(), "0 wells");
    }

    #[test]
    fn irregular_names_are_only_addressable_by_name() {
        let d = definition(&[&["A1", "B1"], &["waste"]]);
        assert_eq!(d.well("waste").map(|w| w.name.as_str()), Some("waste"));
        assert_eq!(d.grid_position("waste"), None);
        assert_eq!(d.row_count(), 2);
        assert_eq!(d.column_count(), 1);
        assert_eq!(d.wells_in_order().count(), 3);
    }

    #[test]
    fn gaps_count_distinct_rows() {
        let d = definition(&[&["A1", "C1"], &["A3", "C3"]]);
        assert_eq!(d.row_count(), 2);
        assert_eq!(d.column_count(), 2);
        assert_eq!(d.well_at(2, 2).map(|w| w.name.as_str()), Some("C3"));
        assert_eq!(d.well_at(1, 0), None);
        assert_eq!(definition(&[]).max_capacity_ul(), 0.0);
    }
}
