//! Loader for Opentrons labware definitions, schema version 2: the JSON format
//! of the Opentrons labware library and of Opentrons Labware Creator.
//!
//! Only the keys this program uses are read; the rest (`cornerOffsetFromSlot`,
//! `groups`, `namespace`, gripper settings, ...) are skipped without being
//! stored. Errors name the JSON path of the offending value and, where it can
//! be found in the text, its line and column.
//!
//! Parsing runs in two steps. Serde reads the document into `Raw*` structs
//! whose leaves are [`Field`]s: a field records a missing key or a value of the
//! wrong type instead of failing, so only JSON syntax errors (and the size
//! limits) stop serde. The checker then walks the structs in a fixed order and
//! reports the first problem with its full path, which serde's own errors lack.

use super::{Dimensions, LabwareDefinition, Well, WellShape};
use indexmap::IndexMap;
use serde::Deserialize;
use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::json;
use std::collections::HashSet;
use std::fmt;
use std::io::Read;
use std::marker::PhantomData;
use std::path::Path;

/// Largest definition file accepted. Real definitions are well under 1 MiB
/// (even a 1536-well plate takes a few hundred KiB); the limit keeps a wrong
/// file from being read into memory whole.
pub const MAX_DEFINITION_BYTES: usize = 16 * 1024 * 1024;

/// Most wells (and names in `ordering`) a definition may have.
pub const MAX_WELLS: usize = 10_000;

/// Why a labware definition could not be loaded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct DefinitionError {
    /// Short and specific, e.g. "wells.A1.totalLiquidVolume must be a positive number (found 0)".
    pub message: String,
    /// 1-based line in the JSON text, when known (always for syntax errors).
    pub line: Option<usize>,
    /// 1-based column in characters, when known.
    pub column: Option<usize>,
    /// What to do about it, when there is something useful to say.
    pub hint: Option<String>,
}

impl DefinitionError {
    fn new(message: impl Into<String>) -> Self {
        DefinitionError {
            message: message.into(),
            line: None,
            column: None,
            hint: None,
        }
    }

    fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// Parses an Opentrons labware schema 2 definition.
pub fn parse_definition(json_text: &str) -> Result<LabwareDefinition, DefinitionError> {
    if json_text.len() > MAX_DEFINITION_BYTES {
        return Err(too_large("the labware definition", json_text.len()));
    }
    // Some Windows editors save a byte-order mark. It is invisible in the
    // editor, so positions are counted without it.
    let text = json_text.strip_prefix('\u{feff}').unwrap_or(json_text);
    let root: Field<RawDefinition> =
        serde_json::from_str(text).map_err(|e| serde_error(text, &e))?;
    Checker { text }.definition(root)
}

/// Reads and parses an Opentrons labware schema 2 definition file.
pub fn load_definition_file(path: &Path) -> Result<LabwareDefinition, DefinitionError> {
    let shown = path.display();
    let read_error = |e: std::io::Error| {
        let error = DefinitionError::new(format!("cannot read labware definition `{shown}`: {e}"));
        if e.kind() == std::io::ErrorKind::InvalidData {
            error.with_hint("the file must be UTF-8 text")
        } else {
            error
        }
    };
    // Only regular files: opening a FIFO, a serial port or a socket (e.g. under
    // /proc/self/fd) could block for ever or take bytes meant for a driver.
    // Checked before opening, since opening is what blocks.
    let meta = std::fs::metadata(path).map_err(read_error)?;
    if !meta.is_file() {
        return Err(DefinitionError::new(format!(
            "cannot read labware definition `{shown}`: not a regular file"
        )));
    }
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut text = String::new();
    // Reading one byte past the limit is enough to know the file is too
    // large, without trusting the size the file system reports.
    file.take(MAX_DEFINITION_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .map_err(read_error)?;
    if text.len() > MAX_DEFINITION_BYTES {
        return Err(too_large(&format!("`{shown}`"), text.len()));
    }
    parse_definition(&text)
}

/// Writes a definition as an Opentrons labware schema 2 document, e.g. to
/// hand a built-in definition to the Opentrons app. `parse_definition` reads
/// the result back to an equal definition.
pub fn to_opentrons_json(definition: &LabwareDefinition) -> serde_json::Value {
    let wells: serde_json::Map<String, serde_json::Value> = definition
        .wells
        .iter()
        .map(|(name, well)| {
            let mut value = json!({
                "depth": well.depth_mm,
                "totalLiquidVolume": well.capacity_ul,
                "x": well.x_mm,
                "y": well.y_mm,
                "z": well.z_mm,
            });
            match well.shape {
                WellShape::Circular { diameter_mm } => {
                    value["shape"] = json!("circular");
                    value["diameter"] = json!(diameter_mm);
                }
                WellShape::Rectangular { x_mm, y_mm } => {
                    value["shape"] = json!("rectangular");
                    value["xDimension"] = json!(x_mm);
                    value["yDimension"] = json!(y_mm);
                }
            }
            (name.clone(), value)
        })
        .collect();
    // Opentrons uses the format to decide how multi-channel pipettes reach
    // wells; "irregular" is the safe choice for anything but the standard grids.
    let grid = (definition.row_count(), definition.column_count());
    let format = match (definition.wells.len(), grid) {
        (96, (8, 12)) => "96Standard",
        (384, (16, 24)) => "384Standard",
        _ => "irregular",
    };
    let mut parameters = json!({
        "format": format,
        "quirks": [],
        "isTiprack": definition.is_tiprack,
        "isMagneticModuleCompatible": false,
        "loadName": definition.load_name,
    });
    if let Some(tip_length) = definition.tip_length_mm {
        parameters["tipLength"] = json!(tip_length);
    }
    let all_wells: Vec<&String> = definition.columns.iter().flatten().collect();
    json!({
        "ordering": definition.columns,
        "brand": { "brand": definition.brand, "brandId": [] },
        "metadata": {
            "displayName": definition.display_name,
            "displayCategory": if definition.is_tiprack { "tipRack" } else { "other" },
            "displayVolumeUnits": "µL",
            "tags": [],
        },
        "dimensions": {
            "xDimension": definition.dimensions.x_mm,
            "yDimension": definition.dimensions.y_mm,
            "zDimension": definition.dimensions.z_mm,
        },
        "wells": wells,
        "groups": [{ "metadata": {}, "wells": all_wells }],
        "parameters": parameters,
        "namespace": "custom_beta",
        "version": 1,
        "schemaVersion": 2,
        "cornerOffsetFromSlot": { "x": 0, "y": 0, "z": 0 },
    })
}

fn too_large(what: &str, bytes: usize) -> DefinitionError {
    // Lossy only for sizes no file system holds; this is a message.
    let mib = bytes as f64 / (1024.0 * 1024.0);
    DefinitionError::new(format!(
        "{what} is {mib:.1} MiB, more than the limit of {} MiB",
        MAX_DEFINITION_BYTES / (1024 * 1024)
    ))
    .with_hint("labware definitions are normally well under 1 MiB: is this the right file?")
}

const SCHEMA_HINT: &str = "this program reads Opentrons labware definitions with \"schemaVersion\": 2 \
     (the Opentrons labware library and Labware Creator format)";

// ---------------------------------------------------------------------------
// Serde side: the document's shape, tolerant of missing keys and wrong types.

/// One value of the document as serde found it.
#[derive(Default)]
enum Field<T> {
    #[default]
    Missing,
    Wrong {
        found: Found,
        expected: &'static str,
    },
    Present(T),
}

/// A value of an unexpected type, described for messages.
enum Found {
    Null,
    Bool(bool),
    Number(f64),
    Str(String),
    Object,
    Array,
}

impl Found {
    fn string(text: &str) -> Self {
        Found::Str(text.to_string())
    }
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::Null => f.write_str("null"),
            Found::Bool(b) => write!(f, "{b}"),
            Found::Number(n) => f.write_str(&number_text(*n)),
            Found::Str(s) => f.write_str(&quoted(s)),
            Found::Object => f.write_str("an object"),
            Found::Array => f.write_str("an array"),
        }
    }
}

/// What a [`Field`] accepts. Each hook returns `None` for a value of the
/// wrong kind; maps and arrays of the wrong kind are skipped unread.
trait Expect<'de>: Sized {
    /// How messages name the accepted kind: "a number".
    const EXPECTED: &'static str;

    fn from_bool(_: bool) -> Option<Self> {
        None
    }

    fn from_number(_: f64) -> Option<Self> {
        None
    }

    fn from_str(_: &str) -> Option<Self> {
        None
    }

    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Option<Self>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Option<Self>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

impl<'de, T: Expect<'de>> Field<T> {
    fn checked(value: Option<T>, found: impl FnOnce() -> Found) -> Self {
        match value {
            Some(value) => Field::Present(value),
            None => Field::Wrong {
                found: found(),
                expected: T::EXPECTED,
            },
        }
    }
}

impl<'de, T: Expect<'de>> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(FieldVisitor(PhantomData))
    }
}

struct FieldVisitor<T>(PhantomData<T>);

impl<'de, T: Expect<'de>> Visitor<'de> for FieldVisitor<T> {
    type Value = Field<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(T::EXPECTED)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Field::checked(T::from_bool(v), || Found::Bool(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        self.visit_f64(v as f64)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        self.visit_f64(v as f64)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Field::checked(T::from_number(v), || Found::Number(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Field::checked(T::from_str(v), || Found::string(v)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Field::checked(None, || Found::Null))
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_unit()
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Ok(Field::checked(T::from_map(map)?, || Found::Object))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        Ok(Field::checked(T::from_seq(seq)?, || Found::Array))
    }
}

impl Expect<'_> for f64 {
    const EXPECTED: &'static str = "a number";

    fn from_number(v: f64) -> Option<Self> {
        Some(v)
    }
}

impl Expect<'_> for bool {
    const EXPECTED: &'static str = "true or false";

    fn from_bool(v: bool) -> Option<Self> {
        Some(v)
    }
}

impl Expect<'_> for String {
    const EXPECTED: &'static str = "a string";

    fn from_str(v: &str) -> Option<Self> {
        Some(v.to_string())
    }
}

/// Lets a derived struct be a [`Field`]: it is read from a JSON object.
macro_rules! expect_object {
    ($($raw:ty),*) => {$(
        impl<'de> Expect<'de> for $raw {
            const EXPECTED: &'static str = "an object";

            fn from_map<A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
                <$raw>::deserialize(MapAccessDeserializer::new(map)).map(Some)
            }
        }
    )*};
}

expect_object!(
    RawDefinition,
    RawParameters,
    RawMetadata,
    RawBrand,
    RawDimensions,
    RawWell
);

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawDefinition {
    schema_version: Field<f64>,
    parameters: Field<RawParameters>,
    metadata: Field<RawMetadata>,
    brand: Field<RawBrand>,
    dimensions: Field<RawDimensions>,
    ordering: Field<RawOrdering>,
    wells: Field<RawWells>,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawParameters {
    format: Field<String>,
    is_tiprack: Field<bool>,
    tip_length: Field<f64>,
    load_name: Field<String>,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawMetadata {
    display_name: Field<String>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct RawBrand {
    brand: Field<String>,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawDimensions {
    x_dimension: Field<f64>,
    y_dimension: Field<f64>,
    z_dimension: Field<f64>,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawWell {
    depth: Field<f64>,
    x: Field<f64>,
    y: Field<f64>,
    z: Field<f64>,
    total_liquid_volume: Field<f64>,
    shape: Field<String>,
    diameter: Field<f64>,
    x_dimension: Field<f64>,
    y_dimension: Field<f64>,
}

/// `ordering`: columns of well names. Read with a running count so that a
/// huge array is rejected while it is read, not after.
struct RawOrdering(Vec<Field<RawColumn>>);

struct RawColumn(Vec<Field<String>>);

impl<'de> Expect<'de> for RawOrdering {
    const EXPECTED: &'static str = "an array of columns";

    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Option<Self>, A::Error> {
        let mut columns = Vec::new();
        let mut names = 0usize;
        while let Some(column) = seq.next_element::<Field<RawColumn>>()? {
            if let Field::Present(RawColumn(column)) = &column {
                names += column.len();
            }
            if names > MAX_WELLS {
                return Err(de::Error::custom(format!(
                    "ordering lists more than {MAX_WELLS} wells, the most a definition may have"
                )));
            }
            if columns.len() == MAX_WELLS {
                return Err(de::Error::custom(format!(
                    "ordering has more than {MAX_WELLS} columns"
                )));
            }
            columns.push(column);
        }
        Ok(Some(RawOrdering(columns)))
    }
}

impl<'de> Expect<'de> for RawColumn {
    const EXPECTED: &'static str = "an array of well names";

    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Option<Self>, A::Error> {
        let mut names = Vec::new();
        while let Some(name) = seq.next_element::<Field<String>>()? {
            if names.len() == MAX_WELLS {
                return Err(de::Error::custom(format!(
                    "ordering lists more than {MAX_WELLS} wells, the most a definition may have"
                )));
            }
            names.push(name);
        }
        Ok(Some(RawColumn(names)))
    }
}

/// `wells`, in document order. A repeated name is remembered rather than
/// silently overwriting the first well (as a plain map would).
struct RawWells {
    wells: IndexMap<String, Field<RawWell>>,
    first_duplicate: Option<String>,
}

impl<'de> Expect<'de> for RawWells {
    const EXPECTED: &'static str = "an object of wells by name";

    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Option<Self>, A::Error> {
        let mut wells = IndexMap::new();
        let mut first_duplicate = None;
        while let Some(name) = map.next_key::<String>()? {
            let well = map.next_value::<Field<RawWell>>()?;
            if wells.contains_key(&name) {
                first_duplicate.get_or_insert(name);
                continue;
            }
            if wells.len() == MAX_WELLS {
                return Err(de::Error::custom(format!(
                    "wells has more than {MAX_WELLS} wells, the most a definition may have"
                )));
            }
            wells.insert(name, well);
        }
        Ok(Some(RawWells {
            wells,
            first_duplicate,
        }))
    }
}

// ---------------------------------------------------------------------------
// Checker side: turns the raw structs into a definition, or the first error.

/// One step of a JSON path.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

use Seg::{Index, Key};

struct Checker<'t> {
    text: &'t str,
}

impl Checker<'_> {
    fn definition(&self, root: Field<RawDefinition>) -> Result<LabwareDefinition, DefinitionError> {
        let raw = self.required(root, &[])?;
        self.schema_version(raw.schema_version)?;

        let parameters = self.required(raw.parameters, &[Key("parameters")])?;
        let load_name = self.load_name(parameters.load_name)?;
        self.required(parameters.format, &[Key("parameters"), Key("format")])?;
        let is_tiprack = self.required(
            parameters.is_tiprack,
            &[Key("parameters"), Key("isTiprack")],
        )?;
        let tip_length_path = [Key("parameters"), Key("tipLength")];
        let tip_length_mm = self
            .optional(parameters.tip_length, &tip_length_path)?
            .map(|length| self.positive_value(length, &tip_length_path))
            .transpose()?;
        if is_tiprack && tip_length_mm.is_none() {
            return Err(self
                .error(
                    &[Key("parameters"), Key("isTiprack")],
                    "parameters.tipLength is required when parameters.isTiprack is true",
                )
                .with_hint(
                    "add \"tipLength\": the length of one tip in mm, e.g. \"tipLength\": 59.3",
                ));
        }

        let metadata = self.required(raw.metadata, &[Key("metadata")])?;
        let display_name = self.required(
            metadata.display_name,
            &[Key("metadata"), Key("displayName")],
        )?;
        let brand = self.required(raw.brand, &[Key("brand")])?;
        let brand = self.required(brand.brand, &[Key("brand"), Key("brand")])?;

        let dimensions = self.required(raw.dimensions, &[Key("dimensions")])?;
        let dimensions = Dimensions {
            x_mm: self.positive(
                dimensions.x_dimension,
                &[Key("dimensions"), Key("xDimension")],
            )?,
            y_mm: self.positive(
                dimensions.y_dimension,
                &[Key("dimensions"), Key("yDimension")],
            )?,
            z_mm: self.positive(
                dimensions.z_dimension,
                &[Key("dimensions"), Key("zDimension")],
            )?,
        };

        let columns = self.ordering(raw.ordering)?;
        let wells = self.wells(raw.wells, &columns)?;
        Ok(LabwareDefinition {
            load_name,
            display_name,
            brand,
            is_tiprack,
            tip_length_mm,
            dimensions,
            columns,
            wells,
        })
    }

    fn schema_version(&self, field: Field<f64>) -> Result<(), DefinitionError> {
        let path = [Key("schemaVersion")];
        let version = self
            .required(field, &path)
            .map_err(|e| e.with_hint(SCHEMA_HINT))?;
        if version == 2.0 {
            return Ok(());
        }
        let hint = if version == 3.0 {
            "schema 3 definitions (newer Opentrons labware) are not supported yet; \
             use the schema 2 version of this labware if there is one"
        } else {
            SCHEMA_HINT
        };
        Err(self
            .error(
                &path,
                format!("schemaVersion must be 2 (found {})", number_text(version)),
            )
            .with_hint(hint))
    }

    fn load_name(&self, field: Field<String>) -> Result<String, DefinitionError> {
        let path = [Key("parameters"), Key("loadName")];
        let name = self.required(field, &path)?;
        // The Opentrons schema's pattern for load names; protocols refer to
        // labware by it, so it has to survive being typed.
        let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '_';
        if name.is_empty() || !name.chars().all(valid) {
            return Err(self
                .error(
                    &path,
                    format!(
                        "parameters.loadName must be lower-case letters, digits, '.' and '_' (found {})",
                        quoted(&name)
                    ),
                )
                .with_hint("e.g. \"acme_96_wellplate_200ul\""));
        }
        Ok(name)
    }

    fn ordering(&self, field: Field<RawOrdering>) -> Result<Vec<Vec<String>>, DefinitionError> {
        let RawOrdering(raw_columns) = self.required(field, &[Key("ordering")])?;
        if raw_columns.is_empty() {
            return Err(self
                .error(
                    &[Key("ordering")],
                    "ordering is empty: it must list at least one column of wells",
                )
                .with_hint("e.g. \"ordering\": [[\"A1\", \"B1\"], [\"A2\", \"B2\"]]"));
        }
        let mut seen = HashSet::new();
        let mut columns = Vec::with_capacity(raw_columns.len());
        for (c, raw_column) in raw_columns.into_iter().enumerate() {
            let RawColumn(raw_names) = self.required(raw_column, &[Key("ordering"), Index(c)])?;
            if raw_names.is_empty() {
                return Err(self.error(
                    &[Key("ordering"), Index(c)],
                    format!("ordering[{c}] is an empty column"),
                ));
            }
            let mut column = Vec::with_capacity(raw_names.len());
            for (r, raw_name) in raw_names.into_iter().enumerate() {
                let path = [Key("ordering"), Index(c), Index(r)];
                let name = self.required(raw_name, &path)?;
                if name.is_empty() {
                    return Err(
                        self.error(&path, format!("ordering[{c}][{r}] is an empty well name"))
                    );
                }
                if !seen.insert(name.clone()) {
                    return Err(self
                        .error(
                            &path,
                            format!(
                                "ordering[{c}][{r}] lists well {} a second time",
                                quoted(&name)
                            ),
                        )
                        .with_hint("each well appears once in ordering"));
                }
                column.push(name);
            }
            columns.push(column);
        }
        Ok(columns)
    }

    fn wells(
        &self,
        field: Field<RawWells>,
        columns: &[Vec<String>],
    ) -> Result<IndexMap<String, Well>, DefinitionError> {
        let raw = self.required(field, &[Key("wells")])?;
        if let Some(name) = &raw.first_duplicate {
            return Err(self
                .error_at(
                    &[Key("wells"), Key(name)],
                    1,
                    format!("wells lists {} twice", quoted(name)),
                )
                .with_hint("each well name may appear only once in wells"));
        }
        let listed: HashSet<&str> = columns.iter().flatten().map(String::as_str).collect();
        if let Some(name) = raw
            .wells
            .keys()
            .find(|name| !listed.contains(name.as_str()))
        {
            let path = [Key("wells"), Key(name)];
            return Err(self
                .error(
                    &path,
                    format!("{} is not listed in ordering", path_text(&path)),
                )
                .with_hint("add the well to its column in ordering, or remove it from wells"));
        }
        // Checked in document order, so the first error is the first in the file.
        let mut checked = IndexMap::with_capacity(raw.wells.len());
        for (name, raw_well) in raw.wells {
            let well = self.well(&name, raw_well)?;
            checked.insert(name, well);
        }
        let mut wells = IndexMap::with_capacity(checked.len());
        for (c, column) in columns.iter().enumerate() {
            for (r, name) in column.iter().enumerate() {
                let Some(well) = checked.swap_remove(name) else {
                    return Err(self
                        .error(
                            &[Key("ordering"), Index(c), Index(r)],
                            format!(
                                "ordering[{c}][{r}] names well {}, which is missing from wells",
                                quoted(name)
                            ),
                        )
                        .with_hint("every well in ordering needs an entry in wells"));
                };
                wells.insert(name.clone(), well);
            }
        }
        Ok(wells)
    }

    fn well(&self, name: &str, field: Field<RawWell>) -> Result<Well, DefinitionError> {
        let raw = self.required(field, &[Key("wells"), Key(name)])?;
        let at = |key| [Key("wells"), Key(name), Key(key)];
        let depth_mm = self.positive(raw.depth, &at("depth"))?;
        let capacity_ul = self.positive(raw.total_liquid_volume, &at("totalLiquidVolume"))?;
        let x_mm = self.required(raw.x, &at("x"))?;
        let y_mm = self.required(raw.y, &at("y"))?;
        let z_mm = self.required(raw.z, &at("z"))?;
        let shape_name = self.required(raw.shape, &at("shape"))?;
        // A size key the shape needs but that is absent is reported at
        // `shape`, which is what makes it required.
        let size = |field: Field<f64>, key: &'static str| match field {
            Field::Missing => Err(self.error(
                &at("shape"),
                format!(
                    "{} is {shape_name}, so it needs {}",
                    path_text(&[Key("wells"), Key(name)]),
                    path_text(&at(key))
                ),
            )),
            field => self.positive(field, &at(key)),
        };
        let shape = match shape_name.as_str() {
            "circular" => WellShape::Circular {
                diameter_mm: size(raw.diameter, "diameter")?,
            },
            "rectangular" => WellShape::Rectangular {
                x_mm: size(raw.x_dimension, "xDimension")?,
                y_mm: size(raw.y_dimension, "yDimension")?,
            },
            other => {
                return Err(self.error(
                    &at("shape"),
                    format!(
                        "{} must be \"circular\" or \"rectangular\" (found {})",
                        path_text(&at("shape")),
                        quoted(other)
                    ),
                ));
            }
        };
        Ok(Well {
            name: name.to_string(),
            x_mm,
            y_mm,
            z_mm,
            depth_mm,
            capacity_ul,
            shape,
        })
    }

    fn required<T>(&self, field: Field<T>, path: &[Seg<'_>]) -> Result<T, DefinitionError> {
        match field {
            Field::Present(value) => Ok(value),
            Field::Missing => {
                let message = format!("{} is required", path_text(path));
                // Point at the object that lacks the key; a missing top-level
                // key has no better place than the whole file.
                Err(match path.split_last() {
                    Some((_, parent)) if !parent.is_empty() => self.error(parent, message),
                    _ => DefinitionError::new(message),
                })
            }
            Field::Wrong { found, expected } => Err(self.error(
                path,
                format!("{} must be {expected} (found {found})", path_text(path)),
            )),
        }
    }

    /// An optional key; `null` counts as absent.
    fn optional<T>(&self, field: Field<T>, path: &[Seg<'_>]) -> Result<Option<T>, DefinitionError> {
        match field {
            Field::Missing
            | Field::Wrong {
                found: Found::Null, ..
            } => Ok(None),
            field => self.required(field, path).map(Some),
        }
    }

    fn positive(&self, field: Field<f64>, path: &[Seg<'_>]) -> Result<f64, DefinitionError> {
        let value = self.required(field, path)?;
        self.positive_value(value, path)
    }

    fn positive_value(&self, value: f64, path: &[Seg<'_>]) -> Result<f64, DefinitionError> {
        if value.is_finite() && value > 0.0 {
            Ok(value)
        } else {
            Err(self.error(
                path,
                format!(
                    "{} must be a positive number (found {})",
                    path_text(path),
                    number_text(value)
                ),
            ))
        }
    }

    fn error(&self, path: &[Seg<'_>], message: impl Into<String>) -> DefinitionError {
        self.error_at(path, 0, message)
    }

    /// An error located at the `nth` (0-based) occurrence of `path`'s last key.
    fn error_at(
        &self,
        path: &[Seg<'_>],
        nth: usize,
        message: impl Into<String>,
    ) -> DefinitionError {
        let mut error = DefinitionError::new(message);
        if let Some(offset) = locate(self.text, path, nth) {
            let (line, column) = line_column(self.text, offset);
            error.line = Some(line);
            error.column = Some(column);
        }
        error
    }
}

/// "wells.A1.depth", "ordering[0][2]", `wells["A 1"]`.
fn path_text(path: &[Seg<'_>]) -> String {
    if path.is_empty() {
        return "the document".to_string();
    }
    let mut text = String::new();
    for seg in path {
        match *seg {
            Key(key)
                if !key.is_empty()
                    && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
            {
                if !text.is_empty() {
                    text.push('.');
                }
                text.push_str(key);
            }
            Key(key) => text.push_str(&format!("[{}]", quoted(key))),
            Index(index) => text.push_str(&format!("[{index}]")),
        }
    }
    text
}

/// A string for a message: quoted, escaped, and cut short if long.
fn quoted(text: &str) -> String {
    const MAX_CHARS: usize = 40;
    match text.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{:?}…", text.get(..cut).unwrap_or_default()),
        None => format!("{text:?}"),
    }
}

/// A number for a message, without 300 digits for 1e300.
fn number_text(value: f64) -> String {
    if value != 0.0 && (value.abs() >= 1e15 || value.abs() < 1e-6) {
        format!("{value:e}")
    } else {
        format!("{value}")
    }
}

// ---------------------------------------------------------------------------
// Positions: serde_json's errors carry a line and a byte column; the checker's
// errors are found by walking the (already validated) text to a path.

/// Converts a serde_json error, whose column counts bytes, to a DefinitionError.
fn serde_error(text: &str, error: &serde_json::Error) -> DefinitionError {
    let full = error.to_string();
    let suffix = format!(" at line {} column {}", error.line(), error.column());
    let detail = full.strip_suffix(&suffix).unwrap_or(&full);
    let mut result = match error.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            // serde_json names a trailing comma only in some contexts; in
            // skipped values it says "expected value" at the closing bracket.
            let detail = if is_trailing_comma(text, error.line(), error.column()) {
                "trailing comma"
            } else {
                detail
            };
            let result = DefinitionError::new(format!("invalid JSON: {detail}"));
            match syntax_hint(detail) {
                Some(hint) => result.with_hint(hint),
                None => result,
            }
        }
        serde_json::error::Category::Data | serde_json::error::Category::Io => {
            let result = DefinitionError::new(detail);
            if detail.starts_with("duplicate field") {
                result.with_hint("each key may appear only once in an object")
            } else {
                result
            }
        }
    };
    // serde_json reports line 0 only for errors that have no position.
    if error.line() > 0 {
        result.line = Some(error.line());
        result.column = Some(char_column(text, error.line(), error.column()));
    }
    result
}

fn syntax_hint(detail: &str) -> Option<&'static str> {
    let hint = if detail.contains("trailing comma") {
        "JSON allows no comma after the last item of an object or array"
    } else if detail.contains("key must be a string") {
        "keys need double quotes, e.g. \"depth\": 10.5"
    } else if detail.starts_with("EOF") {
        "the text ends too early: look for an unclosed { or [, or a truncated file"
    } else if detail.contains("trailing characters") {
        "there is more text after the end of the definition"
    } else if detail.contains("expected value") {
        "look for a stray character, a single-quoted string or a comment (JSON has none)"
    } else if detail.contains("recursion limit") {
        "the document is nested far deeper than a labware definition"
    } else {
        return None;
    };
    Some(hint)
}

/// Byte offset where `line` (1-based) starts.
fn line_start(text: &str, line: usize) -> usize {
    text.split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum()
}

/// Whether serde_json's error position is a closing bracket right after a comma.
fn is_trailing_comma(text: &str, line: usize, byte_column: usize) -> bool {
    let bytes = text.as_bytes();
    // The column is 1-based and points at the offending byte.
    let Some(at) = (line_start(text, line) + byte_column).checked_sub(1) else {
        return false;
    };
    let before = bytes.get(..at).unwrap_or_default();
    matches!(bytes.get(at), Some(b']' | b'}'))
        && before.iter().rev().find(|b| !b.is_ascii_whitespace()) == Some(&b',')
}

/// The 1-based character column of serde_json's byte column on `line`.
fn char_column(text: &str, line: usize, byte_column: usize) -> usize {
    let line_start = line_start(text, line);
    let line_text = text
        .get(line_start..)
        .and_then(|rest| rest.split('\n').next())
        .unwrap_or_default();
    let mut end = byte_column.min(line_text.len());
    // A column inside a multi-byte character counts that character.
    while !line_text.is_char_boundary(end) {
        end += 1;
    }
    line_text.get(..end).map_or(0, |s| s.chars().count()).max(1)
}

/// 1-based line and character column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = text.get(..offset).unwrap_or_default();
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// Byte offset of the key (or array element) that `path` leads to, taking the
/// `nth` occurrence of a repeated last key; the root value for an empty path.
///
/// Expects JSON that serde_json has accepted, but returns `None` rather than
/// misbehave on anything else.
fn locate(text: &str, path: &[Seg<'_>], nth: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut pos = skip_whitespace(bytes, 0);
    let mut found = pos;
    for (depth, seg) in path.iter().enumerate() {
        match *seg {
            Key(key) => {
                if bytes.get(pos) != Some(&b'{') {
                    return None;
                }
                let mut skip = if depth + 1 == path.len() { nth } else { 0 };
                pos = skip_whitespace(bytes, pos + 1);
                loop {
                    let key_start = pos;
                    let key_end = skip_string(bytes, key_start)?;
                    let colon = skip_whitespace(bytes, key_end);
                    if bytes.get(colon) != Some(&b':') {
                        return None;
                    }
                    let value = skip_whitespace(bytes, colon + 1);
                    if key_matches(text.get(key_start..key_end)?, key) {
                        if skip == 0 {
                            found = key_start;
                            pos = value;
                            break;
                        }
                        skip -= 1;
                    }
                    pos = skip_whitespace(bytes, skip_value(bytes, value)?);
                    if bytes.get(pos) != Some(&b',') {
                        return None; // end of the object: no such key
                    }
                    pos = skip_whitespace(bytes, pos + 1);
                }
            }
            Index(index) => {
                if bytes.get(pos) != Some(&b'[') {
                    return None;
                }
                pos = skip_whitespace(bytes, pos + 1);
                for _ in 0..index {
                    pos = skip_whitespace(bytes, skip_value(bytes, pos)?);
                    if bytes.get(pos) != Some(&b',') {
                        return None;
                    }
                    pos = skip_whitespace(bytes, pos + 1);
                }
                if matches!(bytes.get(pos), None | Some(b']')) {
                    return None;
                }
                found = pos;
            }
        }
    }
    Some(found)
}

/// Compares a raw JSON key (with its quotes) to a decoded key.
fn key_matches(raw: &str, key: &str) -> bool {
    if raw.contains('\\') {
        serde_json::from_str::<String>(raw).is_ok_and(|decoded| decoded == key)
    } else {
        raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) == Some(key)
    }
}

fn skip_whitespace(bytes: &[u8], mut pos: usize) -> usize {
    while matches!(bytes.get(pos), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        pos += 1;
    }
    pos
}

/// The offset just past the string starting at `pos`.
fn skip_string(bytes: &[u8], pos: usize) -> Option<usize> {
    if bytes.get(pos) != Some(&b'"') {
        return None;
    }
    let mut i = pos + 1;
    loop {
        match bytes.get(i)? {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
}

/// The offset just past the value starting at `pos`. Iterative, so nesting
/// depth costs no stack.
fn skip_value(bytes: &[u8], pos: usize) -> Option<usize> {
    match bytes.get(pos)? {
        b'"' => skip_string(bytes, pos),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = pos;
            loop {
                match bytes.get(i)? {
                    b'"' => {
                        i = skip_string(bytes, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            let rest = bytes.get(pos..)?;
            let len = rest
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']') || b.is_ascii_whitespace())
                .unwrap_or(rest.len());
            (len > 0).then_some(pos + len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labware::builtin::{builtin, builtin_names};
    use proptest::prelude::*;

    const FIXTURE: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/labware/custom_2x3_plate.json"
    ));

    fn fixture_path() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/labware/custom_2x3_plate.json")
    }

    /// The fixture with the first occurrence of `from` replaced.
    fn fixture_with(from: &str, to: &str) -> String {
        assert!(FIXTURE.contains(from), "fixture lacks {from:?}");
        FIXTURE.replacen(from, to, 1)
    }

    /// 1-based line and column of the first occurrence of `needle`.
    fn position_of(text: &str, needle: &str) -> (Option<usize>, Option<usize>) {
        let offset = text
            .find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in text"));
        let (line, column) = line_column(text, offset);
        (Some(line), Some(column))
    }

    fn error(text: &str) -> DefinitionError {
        match parse_definition(text) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e,
        }
    }

    fn circular(name: &str, x_mm: f64, y_mm: f64) -> Well {
        Well {
            name: name.to_string(),
            x_mm,
            y_mm,
            z_mm: 4.25,
            depth_mm: 17.25,
            capacity_ul: 7000.0,
            shape: WellShape::Circular { diameter_mm: 24.5 },
        }
    }

    fn rectangular(name: &str, y_mm: f64) -> Well {
        Well {
            name: name.to_string(),
            x_mm: 98.88,
            y_mm,
            z_mm: 4.25,
            depth_mm: 17.25,
            capacity_ul: 6500.0,
            shape: WellShape::Rectangular {
                x_mm: 24.0,
                y_mm: 22.5,
            },
        }
    }

    fn expected_fixture() -> LabwareDefinition {
        let wells = [
            circular("A1", 28.88, 57.74),
            circular("B1", 28.88, 27.74),
            circular("A2", 63.88, 57.74),
            circular("B2", 63.88, 27.74),
            rectangular("A3", 57.74),
            rectangular("B3", 27.74),
        ];
        LabwareDefinition {
            load_name: "acme_6_wellplate_7ml_test".into(),
            display_name: "Acme 6 Well Plate 7 mL (test fixture)".into(),
            brand: "Acme Test Labware".into(),
            is_tiprack: false,
            tip_length_mm: None,
            dimensions: Dimensions {
                x_mm: 127.76,
                y_mm: 85.48,
                z_mm: 21.5,
            },
            columns: vec![
                vec!["A1".into(), "B1".into()],
                vec!["A2".into(), "B2".into()],
                vec!["A3".into(), "B3".into()],
            ],
            wells: wells.into_iter().map(|w| (w.name.clone(), w)).collect(),
        }
    }

    #[test]
    fn fixture_loads() {
        let definition = load_definition_file(&fixture_path()).unwrap();
        assert_eq!(definition, expected_fixture());
        assert_eq!(definition.row_count(), 2);
        assert_eq!(definition.column_count(), 3);
        assert_eq!(
            definition.size_description(),
            "6 wells, rows A-B, columns 1-3"
        );
        assert_eq!(
            definition.well_at(1, 2).map(|w| w.name.as_str()),
            Some("B3")
        );
        assert_eq!(definition.max_capacity_ul(), 7000.0);
    }

    #[test]
    fn fixture_round_trips_through_export() {
        let definition = parse_definition(FIXTURE).unwrap();
        let exported = serde_json::to_string_pretty(&to_opentrons_json(&definition)).unwrap();
        assert_eq!(parse_definition(&exported).unwrap(), definition);
    }

    #[test]
    fn builtins_round_trip_through_export() {
        for name in builtin_names() {
            let definition = builtin(name).unwrap();
            let exported = to_opentrons_json(definition).to_string();
            assert_eq!(&parse_definition(&exported).unwrap(), definition, "{name}");
        }
        let p96 = to_opentrons_json(builtin("opentrons_96_tiprack_300ul").unwrap());
        assert_eq!(p96["parameters"]["format"], "96Standard");
        assert_eq!(p96["parameters"]["tipLength"], 59.3);
    }

    #[test]
    fn tip_rack_and_odd_names_load() {
        let text = r#"{"schemaVersion": 2,
            "parameters": {"format": "irregular", "isTiprack": true, "tipLength": 51.5, "loadName": "acme_2_tiprack"},
            "metadata": {"displayName": "Acme"}, "brand": {"brand": "Acme"},
            "dimensions": {"xDimension": 127.76, "yDimension": 85.48, "zDimension": 60},
            "ordering": [["A1"], ["waste"]],
            "wells": {
              "waste": {"depth": 50, "totalLiquidVolume": 200, "shape": "circular", "diameter": 5, "x": 30, "y": 40, "z": 10},
              "A1": {"depth": 50, "totalLiquidVolume": 200, "shape": "circular", "diameter": 5, "x": 20, "y": 40, "z": 10, "tipLength": null}
            }}"#;
        let definition = parse_definition(text).unwrap();
        assert!(definition.is_tiprack);
        assert_eq!(definition.tip_length_mm, Some(51.5));
        // Wells come in ordering order, whatever the document order.
        assert_eq!(definition.wells.keys().collect::<Vec<_>>(), ["A1", "waste"]);
        assert_eq!(definition.grid_position("waste"), None);
        assert!(definition.well("waste").is_some());
        assert_eq!(
            definition.size_description(),
            "2 wells, row A, column 1, and 1 off the grid"
        );
    }

    #[test]
    fn byte_order_mark_is_accepted() {
        let with_bom = format!("\u{feff}{FIXTURE}");
        assert_eq!(parse_definition(&with_bom).unwrap(), expected_fixture());
    }

    // --- malformed documents -------------------------------------------

    #[test]
    fn syntax_error_has_position() {
        let e = error("{\n  \"schemaVersion\": 2\n  \"wells\": {}\n}");
        assert_eq!(e.message, "invalid JSON: expected `,` or `}`");
        assert_eq!((e.line, e.column), (Some(3), Some(3)));

        let e = error("{\"a\": [1, 2,]}");
        assert_eq!(e.message, "invalid JSON: trailing comma");
        assert_eq!((e.line, e.column), (Some(1), Some(13)));
        assert!(e.hint.unwrap().contains("no comma after the last item"));

        // In a known key and in a skipped one alike.
        let e = error("{\"ordering\": [[\"A1\"],\n  ]}");
        assert_eq!(e.message, "invalid JSON: trailing comma");
        assert_eq!((e.line, e.column), (Some(2), Some(3)));
        let e = error("{\"tags\": {\"a\": 1 , }}");
        assert_eq!(e.message, "invalid JSON: trailing comma");
        assert_eq!((e.line, e.column), (Some(1), Some(20)));

        let e = error("");
        assert_eq!(e.message, "invalid JSON: EOF while parsing a value");
        assert_eq!((e.line, e.column), (Some(1), Some(1)));

        // Columns count characters, not bytes.
        let e = error("{\"µµ\": 1 x}");
        assert_eq!((e.line, e.column), (Some(1), Some(10)));

        let truncated = &FIXTURE[..FIXTURE.len() / 2];
        let e = error(truncated);
        assert!(
            e.message.starts_with("invalid JSON: EOF while parsing"),
            "{}",
            e.message
        );
        assert!(e.line.is_some() && e.column.is_some());
    }

    #[test]
    fn root_must_be_an_object() {
        let e = error("  [1, 2]");
        assert_eq!(e.message, "the document must be an object (found an array)");
        assert_eq!((e.line, e.column), (Some(1), Some(3)));
    }

    #[test]
    fn schema_version_must_be_2() {
        let text = fixture_with("\"schemaVersion\": 2", "\"schemaVersion\": 3");
        let e = error(&text);
        assert_eq!(e.message, "schemaVersion must be 2 (found 3)");
        assert_eq!((e.line, e.column), position_of(&text, "\"schemaVersion\""));
        assert!(e.hint.unwrap().contains("schema 3"));

        let e = error(&fixture_with(
            "\"schemaVersion\": 2",
            "\"schemaVersion\": \"2\"",
        ));
        assert_eq!(e.message, "schemaVersion must be a number (found \"2\")");

        let e = error(&fixture_with("\"schemaVersion\": 2,", ""));
        assert_eq!(e.message, "schemaVersion is required");
        assert_eq!((e.line, e.column), (None, None));
        assert!(e.hint.unwrap().contains("\"schemaVersion\": 2"));
    }

    #[test]
    fn missing_key_names_its_path() {
        let text = fixture_with(
            "\"loadName\": \"acme_6_wellplate_7ml_test\"",
            "\"load_name\": \"x\"",
        );
        let e = error(&text);
        assert_eq!(e.message, "parameters.loadName is required");
        // Points at the object that lacks it.
        assert_eq!((e.line, e.column), position_of(&text, "\"parameters\""));

        let text = fixture_with("\"depth\": 17.25, ", "");
        let e = error(&text);
        assert_eq!(e.message, "wells.A1.depth is required");
        assert_eq!((e.line, e.column), position_of(&text, "\"A1\": {"));

        let e = error(&fixture_with("\"displayName\"", "\"name\""));
        assert_eq!(e.message, "metadata.displayName is required");

        let e = error(&fixture_with(
            "\"zDimension\": 21.5",
            "\"zDimension\": null",
        ));
        assert_eq!(
            e.message,
            "dimensions.zDimension must be a number (found null)"
        );
    }

    #[test]
    fn wrong_type_names_path_and_value() {
        let text = fixture_with("\"isTiprack\": false", "\"isTiprack\": \"no\"");
        let e = error(&text);
        assert_eq!(
            e.message,
            "parameters.isTiprack must be true or false (found \"no\")"
        );
        assert_eq!((e.line, e.column), position_of(&text, "\"isTiprack\""));

        let e = error(&fixture_with("\"x\": 63.88", "\"x\": [63.88]"));
        assert_eq!(e.message, "wells.A2.x must be a number (found an array)");

        let e = error(&fixture_with("\"brand\": {", "\"brand\": 7, \"unused\": {"));
        assert_eq!(e.message, "brand must be an object (found 7)");

        let b2 = FIXTURE
            .lines()
            .find(|l| l.trim_start().starts_with("\"B2\""))
            .unwrap();
        let text = fixture_with(b2, "    \"B2\": 5,");
        let e = error(&text);
        assert_eq!(e.message, "wells.B2 must be an object (found 5)");
        assert_eq!((e.line, e.column), position_of(&text, "\"B2\": 5"));

        let e = error(&fixture_with("[\"A1\", \"B1\"]", "[\"A1\", 2]"));
        assert_eq!(e.message, "ordering[0][1] must be a string (found 2)");

        let e = error(&fixture_with("[\"A2\", \"B2\"]", "\"A2,B2\""));
        assert_eq!(
            e.message,
            "ordering[1] must be an array of well names (found \"A2,B2\")"
        );
    }

    #[test]
    fn ordering_well_missing_from_wells() {
        let text = fixture_with("[\"A3\", \"B3\"]", "[\"A3\", \"B3\", \"C3\"]");
        let e = error(&text);
        assert_eq!(
            e.message,
            "ordering[2][2] names well \"C3\", which is missing from wells"
        );
        assert_eq!((e.line, e.column), position_of(&text, "\"C3\""));
    }

    #[test]
    fn well_absent_from_ordering() {
        let text = fixture_with("[\"A3\", \"B3\"]", "[\"A3\"]");
        let e = error(&text);
        assert_eq!(e.message, "wells.B3 is not listed in ordering");
        assert_eq!((e.line, e.column), position_of(&text, "\"B3\": {"));
        assert!(e.hint.is_some());
    }

    #[test]
    fn volumes_and_sizes_must_be_positive() {
        let text = fixture_with("\"totalLiquidVolume\": 7000", "\"totalLiquidVolume\": 0");
        let e = error(&text);
        assert_eq!(
            e.message,
            "wells.A1.totalLiquidVolume must be a positive number (found 0)"
        );
        assert_eq!(
            (e.line, e.column),
            position_of(&text, "\"totalLiquidVolume\"")
        );

        let e = error(&fixture_with("\"depth\": 17.25", "\"depth\": -1.5"));
        assert_eq!(
            e.message,
            "wells.A1.depth must be a positive number (found -1.5)"
        );

        let e = error(&fixture_with("\"diameter\": 24.5", "\"diameter\": 0"));
        assert_eq!(
            e.message,
            "wells.A1.diameter must be a positive number (found 0)"
        );

        let e = error(&fixture_with(
            "\"xDimension\": 127.76",
            "\"xDimension\": -127.76",
        ));
        assert_eq!(
            e.message,
            "dimensions.xDimension must be a positive number (found -127.76)"
        );

        let e = error(&fixture_with("\"xDimension\": 24.0", "\"xDimension\": 0.0"));
        assert_eq!(
            e.message,
            "wells.A3.xDimension must be a positive number (found 0)"
        );

        // Too large for an f64: serde_json refuses it as a syntax error.
        let e = error(&fixture_with("\"depth\": 17.25", "\"depth\": 1e999"));
        assert!(
            e.message.starts_with("invalid JSON: number out of range"),
            "{}",
            e.message
        );
    }

    #[test]
    fn well_shape_needs_its_size() {
        let text = fixture_with(", \"diameter\": 24.5", "");
        let e = error(&text);
        assert_eq!(
            e.message,
            "wells.A1 is circular, so it needs wells.A1.diameter"
        );
        assert_eq!((e.line, e.column), position_of(&text, "\"shape\""));

        let e = error(&fixture_with(
            "\"yDimension\": 22.5",
            "\"y_dimension\": 22.5",
        ));
        assert_eq!(
            e.message,
            "wells.A3 is rectangular, so it needs wells.A3.yDimension"
        );

        let e = error(&fixture_with(
            "\"shape\": \"circular\"",
            "\"shape\": \"oval\"",
        ));
        assert_eq!(
            e.message,
            "wells.A1.shape must be \"circular\" or \"rectangular\" (found \"oval\")"
        );
    }

    #[test]
    fn tip_rack_needs_tip_length() {
        let text = fixture_with("\"isTiprack\": false", "\"isTiprack\": true");
        let e = error(&text);
        assert_eq!(
            e.message,
            "parameters.tipLength is required when parameters.isTiprack is true"
        );
        assert_eq!((e.line, e.column), position_of(&text, "\"isTiprack\""));
        assert!(e.hint.unwrap().contains("tipLength"));

        let e = error(&fixture_with(
            "\"isTiprack\": false",
            "\"isTiprack\": true, \"tipLength\": 0",
        ));
        assert_eq!(
            e.message,
            "parameters.tipLength must be a positive number (found 0)"
        );

        let ok = fixture_with(
            "\"isTiprack\": false",
            "\"isTiprack\": true, \"tipLength\": 42.5",
        );
        assert_eq!(parse_definition(&ok).unwrap().tip_length_mm, Some(42.5));
    }

    #[test]
    fn ordering_must_not_be_empty() {
        let start = FIXTURE.find("\"ordering\"").unwrap();
        let end = FIXTURE.find("\"brand\"").unwrap();
        let text = format!(
            "{}\"ordering\": [],\n  {}",
            &FIXTURE[..start],
            &FIXTURE[end..]
        );
        let e = error(&text);
        assert_eq!(
            e.message,
            "ordering is empty: it must list at least one column of wells"
        );
        assert_eq!((e.line, e.column), (Some(2), Some(3)));

        let e = error(&fixture_with("[\"A2\", \"B2\"]", "[]"));
        assert_eq!(e.message, "ordering[1] is an empty column");

        let text = fixture_with("[\"A2\", \"B2\"]", "[\"A2\", \"A1\"]");
        let e = error(&text);
        assert_eq!(e.message, "ordering[1][1] lists well \"A1\" a second time");
        assert_eq!((e.line, e.column), position_of(&text, "\"A1\"]"));
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        let text = fixture_with("\"B1\": {", "\"A1\": {");
        let e = error(&text);
        assert_eq!(e.message, "wells lists \"A1\" twice");
        // The second occurrence, on the line after the first.
        let (first_line, _) = position_of(&text, "\"A1\": {");
        assert_eq!(e.line, first_line.map(|l| l + 1));
        assert_eq!(e.column, Some(5));

        let e = error(&fixture_with(
            "\"depth\": 17.25,",
            "\"depth\": 17.25, \"depth\": 3,",
        ));
        assert_eq!(e.message, "duplicate field `depth`");
        assert!(e.line.is_some());
    }

    #[test]
    fn load_name_follows_the_opentrons_pattern() {
        let e = error(&fixture_with("acme_6_wellplate_7ml_test", "Acme Plate"));
        assert_eq!(
            e.message,
            "parameters.loadName must be lower-case letters, digits, '.' and '_' (found \"Acme Plate\")"
        );
    }

    #[test]
    fn size_limits() {
        let huge = " ".repeat(MAX_DEFINITION_BYTES + 1);
        let e = error(&huge);
        assert_eq!(
            e.message,
            "the labware definition is 16.0 MiB, more than the limit of 16 MiB"
        );

        let wells: Vec<String> = (0..=MAX_WELLS)
            .map(|i| format!("\"W{i}\": {{\"depth\": 1, \"totalLiquidVolume\": 1, \"shape\": \"circular\", \"diameter\": 1, \"x\": 1, \"y\": 1, \"z\": 0}}"))
            .collect();
        let text = fixture_with(
            "\"wells\": {",
            &format!("\"wells\": {{{},", wells.join(",")),
        );
        let e = error(&text);
        assert_eq!(
            e.message,
            "wells has more than 10000 wells, the most a definition may have"
        );

        let names: Vec<String> = (0..=MAX_WELLS).map(|i| format!("\"W{i}\"")).collect();
        let e = error(&fixture_with(
            "[\"A1\", \"B1\"]",
            &format!("[{}]", names.join(",")),
        ));
        assert_eq!(
            e.message,
            "ordering lists more than 10000 wells, the most a definition may have"
        );
    }

    #[test]
    fn file_errors_name_the_path() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/labware/no_such_plate.json");
        let e = load_definition_file(&path).unwrap_err();
        assert!(
            e.message.starts_with("cannot read labware definition `"),
            "{}",
            e.message
        );
        assert!(e.message.contains("no_such_plate.json"), "{}", e.message);
        assert_eq!((e.line, e.column), (None, None));
    }

    #[test]
    fn only_regular_files_are_read() {
        // A device (and, through a link, a FIFO or a serial port) is refused
        // before it is opened.
        let e = load_definition_file(Path::new("/dev/null")).unwrap_err();
        assert!(e.message.ends_with("not a regular file"), "{}", e.message);
        let dir = tempfile::tempdir().unwrap();
        let e = load_definition_file(dir.path()).unwrap_err();
        assert!(e.message.ends_with("not a regular file"), "{}", e.message);
        #[cfg(unix)]
        {
            let link = dir.path().join("plate.json");
            std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
            let e = load_definition_file(&link).unwrap_err();
            assert!(e.message.ends_with("not a regular file"), "{}", e.message);
        }
    }

    #[test]
    fn paths_and_values_in_messages() {
        assert_eq!(path_text(&[]), "the document");
        assert_eq!(
            path_text(&[Key("wells"), Key("A1"), Key("depth")]),
            "wells.A1.depth"
        );
        assert_eq!(
            path_text(&[Key("ordering"), Index(0), Index(2)]),
            "ordering[0][2]"
        );
        assert_eq!(path_text(&[Key("wells"), Key("A 1")]), "wells[\"A 1\"]");
        assert_eq!(quoted(&"x".repeat(50)), format!("\"{}\"…", "x".repeat(40)));
        assert_eq!(number_text(1e300), "1e300");
        assert_eq!(number_text(2.5), "2.5");
    }

    #[test]
    fn locate_handles_escapes_and_nesting() {
        let text = "{\"a\\\"b\": [1, {\"c\": \"}\"}, [2]], \"d\": {\"e\": 1, \"e\": 2}}";
        assert_eq!(locate(text, &[Key("a\"b")], 0), Some(1));
        assert_eq!(
            locate(text, &[Key("a\"b"), Index(1), Key("c")], 0),
            text.find("\"c\"")
        );
        assert_eq!(locate(text, &[Key("a\"b"), Index(2)], 0), text.find("[2]"));
        assert_eq!(locate(text, &[Key("a\"b"), Index(3)], 0), None);
        assert_eq!(locate(text, &[Key("d"), Key("e")], 1), text.rfind("\"e\""));
        assert_eq!(locate(text, &[Key("zz")], 0), None);
        assert_eq!(locate("{", &[Key("a")], 0), None);
        assert_eq!(locate("", &[Index(0)], 0), None);
    }

    // --- never panics --------------------------------------------------

    /// One edit to the fixture, as (position, kind, character).
    fn mutation() -> impl Strategy<Value = (prop::sample::Index, u8, char)> {
        let chars = prop::sample::select(vec![
            '{', '}', '[', ']', '"', ',', ':', '0', '1', '-', '.', 'e', 'n', ' ', '\\', 'A', 'µ',
        ]);
        (any::<prop::sample::Index>(), 0u8..4, chars)
    }

    fn mutate(text: &str, edits: &[(prop::sample::Index, u8, char)]) -> String {
        let mut chars: Vec<char> = text.chars().collect();
        for (at, kind, c) in edits {
            if chars.is_empty() {
                break;
            }
            let i = at.index(chars.len());
            match kind {
                0 => {
                    chars.remove(i);
                }
                1 => chars.insert(i, *c),
                2 => chars[i] = *c,
                _ => {
                    // Drop a run, e.g. a whole key or value.
                    let end = (i + 12).min(chars.len());
                    chars.drain(i..end);
                }
            }
        }
        chars.into_iter().collect()
    }

    fn check_result(text: &str) {
        match parse_definition(text) {
            Ok(d) => {
                assert_eq!(d.wells.len(), d.columns.iter().map(Vec::len).sum::<usize>());
                assert!(d.wells_in_order().count() == d.wells.len());
            }
            Err(e) => {
                assert!(!e.message.is_empty());
                let lines = text.lines().count().max(1);
                if let Some(line) = e.line {
                    assert!((1..=lines + 1).contains(&line), "line {line} of {lines}");
                }
                assert!(e.column.is_none_or(|c| c >= 1));
                assert_eq!(e.line.is_some(), e.column.is_some());
            }
        }
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_text(text in any::<String>()) {
            check_result(&text);
        }

        #[test]
        fn never_panics_on_json_like_text(text in "[\\[\\]{}\",:0-9a-zA-Z .eE+-]{0,300}") {
            check_result(&text);
        }

        #[test]
        fn never_panics_on_mutated_fixture(edits in prop::collection::vec(mutation(), 1..6)) {
            check_result(&mutate(FIXTURE, &edits));
        }
    }
}
