//! Plate maps from the run's last `deck` entry:
//! `{"type":"deck","labware":[{"name","device","slot","load_name","rows",
//! "columns","volumes_ul":{"A1":50.0,..},"tips_used":["A1",..]},..]}`.
//! Each labware is a grid of circles shaded by volume; a tip rack (one with
//! `tips_used`) shows which tips are still there. Read from the JSON alone, so
//! older and newer journals both work; anything missing is said, not guessed.

use super::svg::{c, esc, num, truncate};
use super::{Run, text};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::fmt::Write;

/// The largest grid drawn (a 1536-well plate is 32 × 48).
const MAX_ROWS: u64 = 64;
const MAX_COLUMNS: u64 = 96;
const MAX_LABWARE: usize = 48;
/// Wells drawn in all (each is a circle with a tooltip): 24 plates of 384.
const MAX_WELLS: u64 = 9_216;
/// Volume shading: empty wells white, the fullest this colour.
const FULL: (u8, u8, u8) = (0x6a, 0x1b, 0x9a);
const TIP: &str = "#c9b28a";

/// `A`…`Z`, then `AA`, `AB`… (1536-well plates go to `AF`).
fn row_name(i: u64) -> String {
    crate::labware::row_label(i as usize)
}

/// Whether a deck entry's labware is a tip rack: its definition says so (a
/// built-in, or the protocol's own); without one, a `tips_used` list that
/// names tips or a load name that says it.
fn is_tip_rack(run: &Run, l: &Value) -> bool {
    let Some(used) = l.get("tips_used").and_then(Value::as_array) else {
        return false;
    };
    let load_name = l["load_name"].as_str().unwrap_or("");
    if let Some(d) = crate::labware::builtin::builtin(load_name) {
        return d.is_tiprack;
    }
    let declared = run
        .checked
        .as_ref()
        .and_then(|c| c.protocol.as_ref())
        .and_then(|p| p.labware.get(l["name"].as_str().unwrap_or("")))
        .map(|lw| lw.definition.is_tiprack);
    declared.unwrap_or_else(|| !used.is_empty() || load_name.contains("tiprack"))
}

fn shade(f: f64) -> String {
    let f = if f.is_finite() {
        f.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let mix = |full: u8| (255.0 - (255.0 - f64::from(full)) * f).round() as u8;
    format!("#{:02x}{:02x}{:02x}", mix(FULL.0), mix(FULL.1), mix(FULL.2))
}

pub fn section(out: &mut String, run: &Run) {
    let Some(deck) = run.events.iter().rev().find(|e| e.kind == "deck") else {
        out.push_str(
            "<p>This run's journal has no deck entry (journals of older controllers do not record the decks), so the final well volumes cannot be shown.</p>\n",
        );
        return;
    };
    let Some(labware) = deck.v.get("labware").and_then(Value::as_array) else {
        let _ = writeln!(
            out,
            "<p class=\"warn\">The deck entry #{} has no readable labware list.</p>",
            deck.seq
        );
        return;
    };
    let _ = writeln!(
        out,
        "<p class=\"note\">From the last deck entry (#{}, lab time {}): each well shaded by its volume; hover a well for its name and volume.</p>",
        deck.seq,
        deck.t.map(super::svg::clock).unwrap_or_else(|| "?".into())
    );
    if labware.is_empty() {
        out.push_str("<p>No labware on any deck.</p>\n");
    }
    let mut budget = MAX_WELLS;
    for (k, l) in labware.iter().enumerate() {
        if k >= MAX_LABWARE {
            let _ = writeln!(
                out,
                "<p class=\"warn\">{} more labware not drawn.</p>",
                labware.len() - MAX_LABWARE
            );
            break;
        }
        draw(out, l, is_tip_rack(run, l), &mut budget);
    }
}

fn draw(out: &mut String, l: &Value, tip_rack: bool, budget: &mut u64) {
    let name = text(&l["name"]);
    let mut place = Vec::new();
    let device = text(&l["device"]);
    if !device.is_empty() {
        place.push(format!("on {}", truncate(&device, 80)));
    }
    if !l["slot"].is_null() {
        place.push(format!("slot {}", truncate(&text(&l["slot"]), 20)));
    }
    let load_name = text(&l["load_name"]);
    let _ = writeln!(
        out,
        "<figure class=\"labware\">\n<h3>{}{}</h3>",
        esc(&truncate(
            if name.is_empty() {
                "(unnamed labware)"
            } else {
                &name
            },
            80
        )),
        esc(&format!(
            "{}{}",
            if load_name.is_empty() {
                String::new()
            } else {
                format!(" — {}", truncate(&load_name, 80))
            },
            if place.is_empty() {
                String::new()
            } else {
                format!(", {}", place.join(" "))
            }
        ))
    );
    let (Some(rows), Some(columns)) = (l["rows"].as_u64(), l["columns"].as_u64()) else {
        out.push_str(
            "<p class=\"warn\">Its rows and columns are not recorded: not drawn.</p>\n</figure>\n",
        );
        return;
    };
    if rows == 0 || columns == 0 || rows > MAX_ROWS || columns > MAX_COLUMNS {
        let _ = writeln!(
            out,
            "<p class=\"warn\">A grid of {rows} × {columns} wells cannot be drawn.</p>\n</figure>"
        );
        return;
    }
    if rows * columns > *budget {
        out.push_str("<p class=\"warn\">Not drawn: the report already shows as many wells as it can.</p>\n</figure>\n");
        return;
    }
    *budget -= rows * columns;
    let tips_used: Option<HashSet<&str>> = l
        .get("tips_used")
        .and_then(Value::as_array)
        .filter(|_| tip_rack)
        .map(|a| a.iter().filter_map(Value::as_str).collect());
    let mut volumes: HashMap<&str, f64> = HashMap::new();
    if let Some(m) = l.get("volumes_ul").and_then(Value::as_object) {
        for (well, v) in m {
            volumes.insert(well.as_str(), v.as_f64().unwrap_or(f64::NAN));
        }
    }
    let max = volumes
        .values()
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let cell = (620.0 / columns as f64).clamp(9.0, 34.0);
    let r = cell * 0.42;
    let (left, top) = (30.0, 20.0);
    let grid_w = left + columns as f64 * cell;
    let legend_x = grid_w + 24.0;
    let w = legend_x + 190.0;
    let h = (top + rows as f64 * cell + 8.0).max(96.0);
    let _ = write!(
        out,
        "<svg viewBox=\"0 0 {0} {1}\" width=\"{0}\" height=\"{1}\" role=\"img\" aria-label=\"{2}\">",
        c(w),
        c(h),
        esc(&format!("well map of {}", truncate(&name, 80)))
    );
    let label_every = if cell < 14.0 { 2 } else { 1 };
    for col in 0..columns {
        if col % label_every == 0 || col + 1 == columns {
            let _ = write!(
                out,
                "<text class=\"tick\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                c(left + (col as f64 + 0.5) * cell),
                c(top - 6.0),
                col + 1
            );
        }
    }
    for row in 0..rows {
        if row % label_every == 0 || row + 1 == rows {
            let _ = write!(
                out,
                "<text class=\"tick\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
                c(left - 6.0),
                c(top + (row as f64 + 0.5) * cell + 4.0),
                row_name(row)
            );
        }
    }
    out.push_str("<g stroke=\"#8a919c\">");
    let mut on_grid = 0usize;
    let mut filled = 0usize;
    let mut total = 0.0f64;
    let mut used = 0usize;
    for row in 0..rows {
        for col in 0..columns {
            let well = format!("{}{}", row_name(row), col + 1);
            let (cx, cy) = (
                left + (col as f64 + 0.5) * cell,
                top + (row as f64 + 0.5) * cell,
            );
            let volume = volumes.get(well.as_str()).copied();
            if volume.is_some() {
                on_grid += 1;
            }
            let v = volume.unwrap_or(0.0);
            if v.is_finite() && v > 0.0 {
                filled += 1;
                total += v;
            }
            match &tips_used {
                Some(used_tips) => {
                    let gone = used_tips.contains(well.as_str());
                    if gone {
                        used += 1;
                    }
                    let _ = write!(
                        out,
                        "<circle cx=\"{}\" cy=\"{}\" r=\"{}\" fill=\"{}\"{}><title>{well}: {}</title></circle>",
                        c(cx),
                        c(cy),
                        c(r),
                        if gone { "#ffffff" } else { TIP },
                        if gone {
                            " stroke-dasharray=\"2 2\""
                        } else {
                            ""
                        },
                        if gone { "tip used" } else { "tip present" }
                    );
                }
                None => {
                    let f = if max > 0.0 && v.is_finite() {
                        v / max
                    } else {
                        0.0
                    };
                    let _ = write!(
                        out,
                        "<circle cx=\"{}\" cy=\"{}\" r=\"{}\" fill=\"{}\"><title>{well}: {} µL</title></circle>",
                        c(cx),
                        c(cy),
                        c(r),
                        shade(f),
                        num(v, 2)
                    );
                }
            }
        }
    }
    out.push_str("</g>");
    // The legend.
    let ly = top;
    match &tips_used {
        Some(_) => {
            let _ = write!(
                out,
                "<circle cx=\"{0}\" cy=\"{1}\" r=\"7\" fill=\"{TIP}\" stroke=\"#8a919c\"/><text class=\"tick\" x=\"{2}\" y=\"{3}\">tip present</text>\
                 <circle cx=\"{0}\" cy=\"{4}\" r=\"7\" fill=\"#ffffff\" stroke=\"#8a919c\" stroke-dasharray=\"2 2\"/><text class=\"tick\" x=\"{2}\" y=\"{5}\">tip used</text>",
                c(legend_x + 8.0),
                c(ly + 8.0),
                c(legend_x + 22.0),
                c(ly + 12.0),
                c(ly + 30.0),
                c(ly + 34.0)
            );
        }
        None => {
            // A stepped scale (no gradient ids to collide between plates).
            let steps = 10;
            for k in 0..steps {
                let _ = write!(
                    out,
                    "<rect x=\"{}\" y=\"{}\" width=\"16\" height=\"12\" fill=\"{}\" stroke=\"#8a919c\" stroke-width=\"0.5\"/>",
                    c(legend_x + k as f64 * 16.0),
                    c(ly),
                    shade(k as f64 / (steps - 1) as f64)
                );
            }
            let _ = write!(
                out,
                "<text class=\"tick\" x=\"{0}\" y=\"{1}\">0</text><text class=\"tick\" x=\"{2}\" y=\"{1}\" text-anchor=\"end\">{3} µL</text>\
                 <text class=\"tick\" x=\"{0}\" y=\"{4}\">volume per well</text>",
                c(legend_x),
                c(ly + 26.0),
                c(legend_x + steps as f64 * 16.0),
                num(max, 1),
                c(ly + 42.0)
            );
        }
    }
    out.push_str("</svg>\n");
    let wells = rows * columns;
    let caption = match &tips_used {
        Some(t) => format!(
            "{used} of {wells} tips used{}",
            if t.len() > used {
                format!(" ({} more named that are not on the grid)", t.len() - used)
            } else {
                String::new()
            }
        ),
        None => format!(
            "{filled} of {wells} wells hold liquid, {} µL in all{}",
            num(total, 1),
            if volumes.len() > on_grid {
                format!(
                    "; {} wells named that are not on the grid not drawn",
                    volumes.len() - on_grid
                )
            } else {
                String::new()
            }
        ),
    };
    let _ = writeln!(out, "<figcaption>{}</figcaption>\n</figure>", esc(&caption));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_lettered_like_plates() {
        assert_eq!(row_name(0), "A");
        assert_eq!(row_name(7), "H");
        assert_eq!(row_name(25), "Z");
        assert_eq!(row_name(26), "AA");
        assert_eq!(row_name(31), "AF");
        assert_eq!(row_name(63), "BL");
    }

    #[test]
    fn shading_goes_from_white_to_full() {
        assert_eq!(shade(0.0), "#ffffff");
        assert_eq!(shade(1.0), "#6a1b9a");
        assert_eq!(shade(f64::NAN), "#ffffff");
    }
}
