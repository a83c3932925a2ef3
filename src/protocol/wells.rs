//! Well selections: `plate:A1`, `plate:A1:H12` (a rectangle, walked column by
//! column), `plate:A1,B3,C5` (a list; items may be rectangles too) and
//! `plate:quadrant(2)` (one interleaved quadrant of a 384-well plate, in the
//! order that matches a 96-well plate walked column by column).

use crate::labware::LabwareDefinition;
use std::ops::Range;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WellItem {
    Well(String),
    Rectangle(String, String),
    Quadrant(u8),
}

/// A parsed selection; `items` carry byte ranges relative to the selection text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WellSelection {
    pub labware: String,
    pub items: Vec<(WellItem, Range<usize>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WellSyntaxError {
    pub message: String,
    /// Byte range in the selection text that is wrong.
    pub range: Range<usize>,
}

/// Parses `<labware>:<wells>`.
pub fn parse_selection(text: &str) -> Result<WellSelection, WellSyntaxError> {
    let Some(colon) = text.find(':') else {
        return Err(WellSyntaxError {
            message: format!(
                "`{text}` does not name wells; write `<labware>:<well>`, e.g. `plate:A1`"
            ),
            range: 0..text.len(),
        });
    };
    let labware = text[..colon].trim();
    if labware.is_empty() {
        return Err(WellSyntaxError {
            message: "missing labware name before `:`".into(),
            range: 0..colon.max(1).min(text.len()),
        });
    }
    let mut items = Vec::new();
    let mut offset = colon + 1;
    for part in text[colon + 1..].split(',') {
        let start = offset + (part.len() - part.trim_start().len());
        let trimmed = part.trim();
        let range = start..start + trimmed.len();
        offset += part.len() + 1;
        items.push((parse_item(trimmed, range.clone())?, range));
    }
    Ok(WellSelection {
        labware: labware.to_string(),
        items,
    })
}

fn parse_item(item: &str, range: Range<usize>) -> Result<WellItem, WellSyntaxError> {
    let bad = |message: String| WellSyntaxError {
        message,
        range: range.clone(),
    };
    if item.is_empty() {
        return Err(bad("empty well name".into()));
    }
    if let Some(inner) = item
        .strip_prefix("quadrant(")
        .and_then(|r| r.strip_suffix(')'))
    {
        return match inner.trim().parse::<u8>() {
            Ok(n @ 1..=4) => Ok(WellItem::Quadrant(n)),
            _ => Err(bad(format!("quadrant must be 1, 2, 3 or 4, not `{inner}`"))),
        };
    }
    let mut corners = item.split(':');
    let first = corners.next().unwrap_or_default().trim();
    let second = corners.next().map(str::trim);
    if corners.next().is_some() {
        return Err(bad(format!(
            "`{item}` has too many `:`; a range is `<first>:<last>`, e.g. `A1:H12`"
        )));
    }
    for name in std::iter::once(first).chain(second) {
        if split_well_name(name).is_none() {
            return Err(bad(format!(
                "`{name}` is not a well name; wells are a row letter and a column number, e.g. `B7`"
            )));
        }
    }
    Ok(match second {
        Some(last) => WellItem::Rectangle(first.to_string(), last.to_string()),
        None => WellItem::Well(first.to_string()),
    })
}

/// Row letters (A..Z, AA..) and 1-based column -> 0-based (row, column).
pub fn split_well_name(name: &str) -> Option<(usize, usize)> {
    let letters = name.chars().take_while(|c| c.is_ascii_uppercase()).count();
    if letters == 0 || letters > 2 {
        return None;
    }
    let (row_part, col_part) = name.split_at(letters);
    if col_part.is_empty() || !col_part.chars().all(|c| c.is_ascii_digit()) || col_part.len() > 4 {
        return None;
    }
    let column: usize = col_part.parse().ok()?;
    if column == 0 {
        return None;
    }
    let row = row_part
        .bytes()
        .fold(0usize, |acc, b| acc * 26 + usize::from(b - b'A' + 1))
        - 1;
    Some((row, column - 1))
}

/// Why a selection does not fit a labware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WellRangeError {
    pub message: String,
    pub range: Range<usize>,
    /// The selection names more wells than it may (see [`resolve_at_most`]).
    pub too_many: bool,
}

/// Most wells one selection may name. A list may repeat wells, so without a
/// bound a short text (`plate:A1:H12,A1:H12,...`, 7 bytes per 96 wells) would
/// expand to millions of wells and exhaust memory.
pub const MAX_SELECTION_WELLS: usize = 100_000;

/// Expands a selection against a labware definition, in walking order; at
/// most [`MAX_SELECTION_WELLS`] wells.
pub fn resolve(
    selection: &WellSelection,
    definition: &LabwareDefinition,
) -> Result<Vec<String>, WellRangeError> {
    resolve_at_most(selection, definition, MAX_SELECTION_WELLS)
}

/// [`resolve`], refusing a selection of more than `max` wells (the error has
/// `too_many` set and points at the item that went over).
pub fn resolve_at_most(
    selection: &WellSelection,
    definition: &LabwareDefinition,
    max: usize,
) -> Result<Vec<String>, WellRangeError> {
    let mut wells = Vec::new();
    for (item, range) in &selection.items {
        let outside = |name: &str| WellRangeError {
            message: format!(
                "`{}` has no well {name}: it has {}",
                selection.labware,
                definition.size_description()
            ),
            range: range.clone(),
            too_many: false,
        };
        // Checked before each well is added, so memory stays bounded by `max`.
        let full = |wells: &Vec<String>| -> Result<(), WellRangeError> {
            if wells.len() >= max {
                Err(WellRangeError {
                    message: format!("the selection names more than {max} wells"),
                    range: range.clone(),
                    too_many: true,
                })
            } else {
                Ok(())
            }
        };
        match item {
            WellItem::Well(name) => {
                if definition.well(name).is_none() {
                    return Err(outside(name));
                }
                full(&wells)?;
                wells.push(name.clone());
            }
            WellItem::Rectangle(first, last) => {
                let a = definition
                    .grid_position(first)
                    .ok_or_else(|| outside(first))?;
                let b = definition
                    .grid_position(last)
                    .ok_or_else(|| outside(last))?;
                let (r0, r1) = (a.0.min(b.0), a.0.max(b.0));
                let (c0, c1) = (a.1.min(b.1), a.1.max(b.1));
                for c in c0..=c1 {
                    for r in r0..=r1 {
                        match definition.well_at(r, c) {
                            Some(w) => {
                                full(&wells)?;
                                wells.push(w.name.clone());
                            }
                            None => {
                                return Err(WellRangeError {
                                    message: format!(
                                        "the range {first}:{last} includes positions `{}` does not have ({})",
                                        selection.labware,
                                        definition.size_description()
                                    ),
                                    range: range.clone(),
                                    too_many: false,
                                });
                            }
                        }
                    }
                }
            }
            WellItem::Quadrant(n) => {
                let (rows, cols) = (definition.row_count(), definition.column_count());
                if rows < 2 || cols < 2 || rows % 2 != 0 || cols % 2 != 0 {
                    return Err(WellRangeError {
                        message: format!(
                            "`{}` has no quadrants: quadrant(n) needs an even grid like a 384-well plate, it has {}",
                            selection.labware,
                            definition.size_description()
                        ),
                        range: range.clone(),
                        too_many: false,
                    });
                }
                // Quadrant 1 starts at A1, 2 at A2, 3 at B1, 4 at B2 (the usual
                // 96-to-384 stamping convention).
                let row_offset = usize::from(*n >= 3);
                let col_offset = usize::from(*n == 2 || *n == 4);
                for c in (col_offset..cols).step_by(2) {
                    for r in (row_offset..rows).step_by(2) {
                        let w = definition.well_at(r, c).ok_or_else(|| WellRangeError {
                            message: format!("`{}` has gaps in its grid", selection.labware),
                            range: range.clone(),
                            too_many: false,
                        })?;
                        full(&wells)?;
                        wells.push(w.name.clone());
                    }
                }
            }
        }
    }
    Ok(wells)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labware::builtin::builtin;
    use proptest::prelude::*;

    fn plate96() -> &'static LabwareDefinition {
        builtin("corning_96_wellplate_360ul_flat").unwrap()
    }

    fn expand(text: &str, def: &LabwareDefinition) -> Result<Vec<String>, String> {
        let sel = parse_selection(text).map_err(|e| e.message)?;
        resolve(&sel, def).map_err(|e| e.message)
    }

    #[test]
    fn rectangle_walks_column_by_column() {
        let w = expand("plate:A1:B2", plate96()).unwrap();
        assert_eq!(w, ["A1", "B1", "A2", "B2"]);
        assert_eq!(expand("plate:A1:H12", plate96()).unwrap().len(), 96);
        assert_eq!(expand("plate:H12:A1", plate96()).unwrap().len(), 96);
    }

    #[test]
    fn lists_and_mixed_items() {
        let w = expand("plate:A1, B3,C5:D5", plate96()).unwrap();
        assert_eq!(w, ["A1", "B3", "C5", "D5"]);
    }

    #[test]
    fn outside_the_grid_names_the_size() {
        let e = expand("plate:I1", plate96()).unwrap_err();
        assert!(e.contains("has no well I1"), "{e}");
        assert!(e.contains("96 wells"), "{e}");
        let sel = parse_selection("plate:A1,A13").unwrap();
        let err = resolve(&sel, plate96()).unwrap_err();
        assert_eq!(&"plate:A1,A13"[err.range], "A13");
    }

    #[test]
    fn quadrants_interleave() {
        let p384 = builtin("corning_384_wellplate_112ul_flat").unwrap();
        let q1 = expand("dest:quadrant(1)", p384).unwrap();
        assert_eq!(q1.len(), 96);
        assert_eq!(&q1[..3], ["A1", "C1", "E1"]);
        assert_eq!(q1[8], "A3");
        assert_eq!(expand("dest:quadrant(2)", p384).unwrap()[0], "A2");
        assert_eq!(expand("dest:quadrant(3)", p384).unwrap()[0], "B1");
        assert_eq!(expand("dest:quadrant(4)", p384).unwrap()[95], "P24");
        let mut all: Vec<String> = (1..=4)
            .flat_map(|n| expand(&format!("d:quadrant({n})"), p384).unwrap())
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 384);
        assert!(expand("d:quadrant(5)", p384).is_err());
    }

    #[test]
    fn a_selection_cannot_expand_to_more_than_its_bound() {
        // 7 bytes of text per 96 wells: the bound keeps this from growing with the text.
        let text = format!("plate:{}", vec!["A1:H12"; 2_000].join(","));
        let sel = parse_selection(&text).unwrap();
        let err = resolve(&sel, plate96()).unwrap_err();
        assert!(err.too_many, "{err:?}");
        assert!(
            err.message.contains("more than 100000 wells"),
            "{}",
            err.message
        );
        // The item that went over: the 1042nd range (1041 x 96 = 99 936 wells fit).
        assert_eq!(err.range.start, "plate:".len() + 1041 * 7);
        // Exactly the bound is accepted; one more is not.
        let sel = parse_selection("plate:A1:H12,A1:B1").unwrap();
        assert_eq!(resolve_at_most(&sel, plate96(), 98).unwrap().len(), 98);
        let e = resolve_at_most(&sel, plate96(), 97).unwrap_err();
        assert!(e.too_many);
        assert_eq!(&"plate:A1:H12,A1:B1"[e.range], "A1:B1");
        let p384 = builtin("corning_384_wellplate_112ul_flat").unwrap();
        let q = parse_selection("d:quadrant(1)").unwrap();
        assert!(resolve_at_most(&q, p384, 95).unwrap_err().too_many);
        assert!(!expand_err_is_too_many("plate:I1"));
    }

    fn expand_err_is_too_many(text: &str) -> bool {
        resolve(&parse_selection(text).unwrap(), plate96())
            .unwrap_err()
            .too_many
    }

    #[test]
    fn syntax_errors_point_at_the_item() {
        let e = parse_selection("plate:A1,1A").unwrap_err();
        assert_eq!(&"plate:A1,1A"[e.range], "1A");
        assert!(parse_selection("A1").is_err());
        assert!(parse_selection(":A1").is_err());
        assert!(parse_selection("plate:A1:B2:C3").is_err());
        assert!(parse_selection("plate:").is_err());
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,30}") {
            if let Ok(sel) = parse_selection(&s) {
                let _ = resolve(&sel, plate96());
            }
        }

        #[test]
        fn rectangle_size_is_rows_times_columns(r0 in 0usize..8, r1 in 0usize..8, c0 in 1usize..=12, c1 in 1usize..=12) {
            let row = |r: usize| char::from(b'A' + r as u8);
            let text = format!("p:{}{c0}:{}{c1}", row(r0), row(r1));
            let wells = expand(&text, plate96()).unwrap();
            prop_assert_eq!(wells.len(), (r0.abs_diff(r1) + 1) * (c0.abs_diff(c1) + 1));
            let mut sorted = wells.clone();
            sorted.sort();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), wells.len());
        }

        #[test]
        fn well_names_round_trip(r in 0usize..32, c in 0usize..48) {
            let letters = if r < 26 { char::from(b'A' + r as u8).to_string() }
                else { format!("A{}", char::from(b'A' + (r - 26) as u8)) };
            prop_assert_eq!(split_well_name(&format!("{letters}{}", c + 1)), Some((r, c)));
        }
    }
}
