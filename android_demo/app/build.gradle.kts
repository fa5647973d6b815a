import org.jetbrains.kotlin.gradle.dsl.JvmTarget

plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "org.foldgpt.demo"
    compileSdk = 35

    defaultConfig {
        applicationId = "org.foldgpt.demo"
        minSdk = 28
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        // The executorch-android AAR ships native libraries for these two ABIs only:
        // arm64-v8a for phones, x86_64 for the emulator.
        ndk {
            abiFilters += listOf("arm64-v8a", "x86_64")
        }
    }

    buildTypes {
        release {
            isMinifyEnabled = false
        }
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
}

kotlin {
    compilerOptions {
        jvmTarget.set(JvmTarget.JVM_17)
    }
}

dependencies {
    // The runtime must be the release that wrote the .pte: pyproject.toml pins the exporter to
    // executorch==1.5.1, so the app pins the AAR of the same release. Its API, as this app uses
    // it, is recorded in ../executorch_android_api.txt; tests/test_android_demo.py keeps this pin
    // and the exporter's in step. Brings fbjni and soloader's nativeloader transitively.
    implementation("org.pytorch:executorch-android:1.5.1")
}
