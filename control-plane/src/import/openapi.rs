//! OpenAPI 3 import (being written).
