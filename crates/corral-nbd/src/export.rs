//! The set of exports a server offers: name, description and device.
//!
//! The first export is the default one, selected by clients that send an
//! empty export name. Sizes are read from the devices when each connection
//! negotiates, so a device that grows is seen by new connections.

use std::sync::Arc;

use corral_block::BlockDevice;

use crate::error::NbdError;
use crate::handshake::ExportInfo;
use crate::proto::MAX_STRING_LEN;

/// One named device.
pub struct Export<D> {
    name: String,
    description: String,
    device: Arc<D>,
}

impl<D> Export<D> {
    /// The name clients select it by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The description shown by `nbdinfo --list`.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The device.
    pub fn device(&self) -> &Arc<D> {
        &self.device
    }
}

/// The exports one server offers.
pub struct Exports<D> {
    list: Vec<Export<D>>,
}

impl<D> Default for Exports<D> {
    fn default() -> Self {
        Exports { list: Vec::new() }
    }
}

fn check_string(what: &str, s: &str) -> Result<(), NbdError> {
    if s.len() > MAX_STRING_LEN {
        return Err(NbdError::InvalidExports(format!(
            "{what} is {} bytes long; the protocol allows {MAX_STRING_LEN}",
            s.len()
        )));
    }
    if s.contains('\0') {
        return Err(NbdError::InvalidExports(format!("{what} contains NUL")));
    }
    Ok(())
}

impl<D: BlockDevice> Exports<D> {
    /// No exports yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A single export (which is then also the default export), without
    /// description. The name is validated when serving starts.
    pub fn single(name: impl Into<String>, device: Arc<D>) -> Self {
        Exports {
            list: vec![Export {
                name: name.into(),
                description: String::new(),
                device,
            }],
        }
    }

    /// Add an export. Names must be unique, at most 4096 bytes and free of
    /// NUL; the first export added is the default one.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        description: impl Into<String>,
        device: Arc<D>,
    ) -> Result<&mut Self, NbdError> {
        let name = name.into();
        let description = description.into();
        check_string("export name", &name)?;
        check_string("export description", &description)?;
        if self.list.iter().any(|e| e.name == name) {
            return Err(NbdError::InvalidExports(format!(
                "export {name:?} is listed twice"
            )));
        }
        self.list.push(Export {
            name,
            description,
            device,
        });
        Ok(self)
    }

    /// Builder form of [`Exports::add`].
    pub fn with(
        mut self,
        name: impl Into<String>,
        description: impl Into<String>,
        device: Arc<D>,
    ) -> Result<Self, NbdError> {
        self.add(name, description, device)?;
        Ok(self)
    }

    /// Check what [`Exports::add`] checks, for sets built with [`Exports::single`].
    pub fn validate(&self) -> Result<(), NbdError> {
        if self.list.is_empty() {
            return Err(NbdError::InvalidExports("no exports".into()));
        }
        for (i, e) in self.list.iter().enumerate() {
            check_string("export name", &e.name)?;
            check_string("export description", &e.description)?;
            if self.list[..i].iter().any(|o| o.name == e.name) {
                return Err(NbdError::InvalidExports(format!(
                    "export {:?} is listed twice",
                    e.name
                )));
            }
        }
        Ok(())
    }

    /// Number of exports.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether there are no exports.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The export at `index` (in the order added).
    pub fn get(&self, index: usize) -> Option<&Export<D>> {
        self.list.get(index)
    }

    /// The export called `name`.
    pub fn find(&self, name: &str) -> Option<&Export<D>> {
        self.list.iter().find(|e| e.name == name)
    }

    /// Iterate over the exports.
    pub fn iter(&self) -> impl Iterator<Item = &Export<D>> {
        self.list.iter()
    }

    /// What the handshake needs, with sizes read from the devices now.
    pub fn infos(&self) -> Vec<ExportInfo> {
        self.list
            .iter()
            .map(|e| ExportInfo {
                name: e.name.clone(),
                description: e.description.clone(),
                size: e.device.size(),
                block_size: e.device.block_size(),
            })
            .collect()
    }
}
