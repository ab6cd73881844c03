#pragma once

#if defined(_WIN32)
#if defined(TORCHLORA_BUILDING_LIBRARY)
#define TORCHLORA_API __declspec(dllexport)
#else
#define TORCHLORA_API __declspec(dllimport)
#endif
#else
#define TORCHLORA_API __attribute__((visibility("default")))
#endif
